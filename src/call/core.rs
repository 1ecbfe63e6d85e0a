//! The caller's call, sans-IO: [`CallCore`].
//!
//! Everything a call decides is here; everything it does is an [`Action`] for the driver
//! ([`super::driver`]), which owns the dialog, the media, the channels and the clock. The core
//! is driven like the menu engine and the queue it contains or talks to:
//! [`CallCore::handle`] takes an [`Input`] and `now`, [`CallCore::handle_timeout`] the time
//! when [`CallCore::next_deadline`] comes, and [`CallCore::poll_action`] gives what to do, in
//! order, until `None`. Results of work done elsewhere (a ticket committed, the audit row
//! written, a leg's INVITE sent, the queue's answer) come back as inputs; the driver feeds
//! those it can have at once (a leg placed, the queue's answer) before it reads anything else.
//!
//! What the call is doing is a [`Phase`]: in the menu ([`Engine`]), waiting for or talking to
//! an operator ([`Queued`], with its [`OperatorLeg`]), or being sent to 911 ([`Emergency`]).
//! Timers live in one table indexed by [`Timer`]. After each input the core lets the menu
//! react to what happened ([`CallCore::settle`]): keys pressed while queued, then the menu's
//! inputs; then it tells the driver what the registry shows and where the bridge goes, if
//! that changed (never per packet: the media clock relays bridges itself).
//!
//! The core imports event and value types only: never a socket, a handle, a channel or
//! tokio, and it never reads the clock.

use super::callback::{CallbackRequest, NotKept};
use super::dialplan::{Destination, DialPlan};
use super::emergency::{self, Caller, Emergency, LegIds, Sound};
use super::leg::{BridgeTo, LegEnd, LegId, Media, NotPlaced, PlaceLeg, Placed};
use super::menu_holder::ActiveMenu;
use super::operator_leg::{LegStep, MediaChange, OperatorLeg, OperatorOffer};
use super::setup::CallMeta;
use super::transfer::{self, Connected, Transfer, TransferId, Via};
use super::SUPPORTED_CODECS;
use crate::config::{CallbackConfig, Limits};
use crate::dispatch::emergency::EmergencyConfig;
use crate::dispatch::numbers::{CallbackNumber, Unavailable};
use crate::dispatch::queue::{
    CallerContext, CallerId, OfferFailure, Position, QueueEvent, Refusal,
};
use crate::dispatch::tickets::{Channel, EmergencyAudit, NewTicket};
use crate::media::prompt::{ringback, Prompt};
use crate::media::sdp::{self, Negotiated};
use crate::menu::engine::{self, Engine, EngineStats, Output, TicketRequest};
use crate::sip::message::Method;
use crate::sip::ua::{DialogEvent, LegEvent, Refer};
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Why a call ended, for the log and `ivr311_call_ends_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    CallerHungUp,
    Cancelled,
    MenuHungUp,
    NoMedia,
    MaxDuration,
    SignallingTimeout,
    Shutdown,
    /// Handed to 911 (REFER accepted or announced).
    Emergency,
    /// An admin hung the call up.
    Admin,
    /// The operator ended the bridged call.
    AgentHungUp,
    /// The line the caller was transferred to hung up.
    TargetHungUp,
}

impl EndReason {
    /// Whether a ticket the caller was giving is filed with what they gave: the caller left
    /// (or we stopped the call) in the middle of it, not the menu.
    fn files_what_was_given(self) -> bool {
        matches!(
            self,
            EndReason::CallerHungUp
                | EndReason::SignallingTimeout
                | EndReason::NoMedia
                | EndReason::Shutdown
                | EndReason::MaxDuration
        )
    }
}

/// What every call of a server shares: the settings the core decides with.
#[derive(Debug, Clone)]
pub(crate) struct CoreConfig {
    pub(crate) limits: Limits,
    pub(crate) emergency: EmergencyConfig,
    /// Which numbers may be called back, and how often.
    pub(crate) callback: Arc<CallbackConfig>,
    pub(crate) default_language: String,
    /// Operator queues are configured (else a caller asking for one hears there is none).
    pub(crate) operators: bool,
    /// A call-back trunk is configured (else a call-back request becomes a flagged ticket).
    pub(crate) callbacks: bool,
    /// Where operators may transfer callers.
    pub(crate) dialplan: DialPlan,
    /// How long an agent's phone rings for a caller transferred to them.
    pub(crate) agent_ring: Duration,
    /// The queues whose talks with operators are recorded (`record: true`).
    pub(crate) recorded_queues: Arc<Vec<String>>,
    /// Per queue, the prompt every caller hears before the queue offers them to an operator
    /// (`record_announcement`).
    pub(crate) queue_announcements: Arc<Vec<(String, String)>>,
}

/// What happens to the call, as the driver reports it.
#[derive(Debug)]
pub(crate) enum Input {
    /// An event of the caller's dialog. (INFO keys come as [`Input::Digit`]: the driver
    /// reads them with the media, which knows whether the key was heard in the audio too.)
    Dialog(DialogEvent),
    /// The caller's dialog is gone (the UA forgot it).
    DialogGone,
    /// An event of one of the call's legs (`None`: the UA forgot the leg).
    Leg(LegId, Option<LegEvent>),
    /// A leg's INVITE is out, or could not be sent.
    Placed(LegId, Result<Placed, NotPlaced>),
    /// What the queue tells the waiting caller.
    Queue(QueueEvent),
    /// The queue's answer to [`QueueCommand::Enqueue`].
    Enqueued(Result<Position, Refusal>),
    /// A key, from RFC 4733 or SIP INFO.
    Digit(char),
    /// What was queued to play has played (the driver drops stale notes).
    PlayDone,
    /// The recording could not be started (the file could not be created).
    RecordingFailed,
    /// The media clock ended the recording (silence, or its limit).
    RecordingEnded,
    /// The recording asked for by [`Action::CloseRecording`] with `report` is closed; the
    /// file kept, if any.
    RecordingClosed { media_url: Option<String> },
    /// No media from the caller for `limits.no_media_seconds`.
    NoMedia,
    /// The bridged operator's phone sent nothing for `limits.operator_silence_seconds`.
    LegSilent,
    /// The bridged leg's media failed for good (a browser's DTLS or consent), why.
    LegMediaFailed(String),
    /// A result for the menu: a ticket filed or not, a status looked up.
    Engine(engine::Input),
    /// Text rendered for the menu's spoken placeholders (`@notes`, `@filed`), sent before
    /// the [`engine::Input::Status`] that plays them.
    Spoken(Vec<(String, Arc<Prompt>)>),
    /// The 911 audit row is durable (its id), or could not be written.
    Audited(Option<i64>),
    /// Whether one of the number's daily call-backs was taken (`None`: the count could not be
    /// read or written).
    CallbackClaimed(Option<bool>, CallbackNumber),
    /// The answer to [`Action::KeepPlace`].
    CallbackKept(Result<(), NotKept>),
    /// The call-back ticket of a waiting caller is durable (`true`), or not.
    CallbackFiled(bool),
    /// An admin hangs the call up.
    AdminHangup,
    /// An admin asks for the caller to be transferred to `to` (the dial plan's admin forms);
    /// [`Action::AdminTransferAnswer`] follows.
    AdminTransfer { to: String, via: Via },
    /// The caller's operator `agent` dialled `queue`'s name from their phone: the caller goes
    /// to that queue's front with their wait kept; [`Action::QueueByPhoneAnswer`] follows
    /// once the queue took them, or the transfer failed or was refused.
    QueueByPhone { agent: String, queue: String },
    /// The queue's answer to [`QueueCommand::RingDirect`] (`Err`: the agent's state).
    RangDirect(Result<(), &'static str>),
    /// The queue's answer to [`QueueCommand::Rejoin`].
    Rejoined(Result<Position, Refusal>),
    /// The operator is consulting this target from their phone (`None`: no longer).
    Consulting(Option<String>),
    /// The answer to [`Action::JoinConsult`]: the consulted party (the transfer that rang it,
    /// connected, and the target), or why not (the NOTIFY's status).
    ConsultJoined(Result<Box<(Transfer, Connected)>, (u16, String)>),
    /// The server's drain time is over.
    Closing,
    /// The server is stopping.
    Shutdown,
}

/// What the queue is told about this caller (its id is the driver's).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum QueueCommand {
    /// Wait in `queue`; the answer comes back as [`Input::Enqueued`], and the queue's events
    /// as [`Input::Queue`].
    Enqueue {
        queue: String,
        skill: Option<String>,
        /// Who the caller is, for the operators' consoles.
        context: CallerContext,
    },
    /// Leave the queue, and stop listening to it.
    Abandon,
    /// No longer listen to the queue (the caller's place was handed to a call-back, or the
    /// call with the operator is over).
    StopListening,
    OfferAnswered(String),
    OfferFailed(String, OfferFailure),
    /// The offer to this agent will not be rung (the caller rings one operator at a time).
    OfferWithdrawn(String),
    /// The call with this agent is over.
    CallEnded(String),
    /// Wait at the front of `queue`, the wait counted from `since` (the queue's answer comes
    /// back as [`Input::Rejoined`], its events as [`Input::Queue`]).
    Rejoin {
        queue: String,
        skill: Option<String>,
        since: Instant,
    },
    /// Ring `agent` directly for this caller if they are free ([`Input::RangDirect`]).
    RingDirect {
        agent: String,
        ring_timeout: Duration,
    },
    /// The agent rung directly answered.
    DirectAnswered(String),
    /// The operator (this agent) the caller was talking to is lost: back in line where the
    /// caller stood.
    Requeue(String),
}

/// What the core asks the driver to do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Answer the caller's re-INVITE or UPDATE.
    ReplyCaller {
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
    },
    /// Send a request in the caller's dialog (REFER); its outcome comes back as
    /// [`DialogEvent::RequestOutcome`] with `req`.
    RequestCaller {
        req: u64,
        method: Method,
        headers: Vec<(String, String)>,
    },
    /// Hang the caller up (BYE).
    HangUpCaller,
    /// Queue prompts after whatever plays.
    Play(Vec<Arc<Prompt>>),
    /// Stop playing (barge-in).
    StopPlayback,
    /// The caller's ACK arrived: our media may start.
    ConfirmMedia,
    /// The caller's media changed (re-INVITE, or the answer in an ACK).
    Renegotiate(Media),
    /// Bridge the caller to a leg (the media clock relays both ways), or end the bridge.
    SetBridge(Option<BridgeTo>),
    /// The bridged leg's silence was looked into: watch it afresh.
    RearmLegWatch,
    /// Record the caller (a new file); [`Input::RecordingFailed`] if it cannot be created.
    StartRecording {
        max: Duration,
        silence: Duration,
    },
    /// Close the recording; with `report`, [`Input::RecordingClosed`] follows.
    CloseRecording {
        report: bool,
    },
    /// No more RTP to the caller: the call is ending.
    EndMedia,
    /// Place a leg; [`Input::Placed`] follows.
    PlaceLeg(Box<PlaceLeg>),
    /// Send a request in a leg's dialog (the OPTIONS probe, a transfer's NOTIFY).
    RequestLeg {
        leg: LegId,
        req: u64,
        method: Method,
        headers: Vec<(String, String)>,
        body: Option<(String, Bytes)>,
    },
    /// Answer a request a dialog passed up (REFER): on a leg, or the caller's (`None`).
    AnswerRequest {
        leg: Option<LegId>,
        txn: u64,
        code: u16,
        headers: Vec<(String, String)>,
    },
    /// Answer a leg's re-INVITE or UPDATE.
    ReplyLeg {
        leg: LegId,
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
    },
    /// Let go of a leg.
    DropLeg {
        leg: LegId,
        how: LegEnd,
    },
    /// Commit a ticket; with `report`, the outcome comes back for the menu.
    FileTicket {
        ticket: Box<NewTicket>,
        report: bool,
    },
    /// Look for a duplicate of a request being filed; `engine::Input::Duplicate` follows.
    FindDuplicate {
        service_code: String,
        zipcode: String,
        days: u32,
    },
    /// Add the caller to a request; `engine::Input::Joined` follows.
    JoinRequest(u64),
    /// Look a ticket up for the menu.
    LookupTicket {
        id: u64,
        /// The caller's language, for what is spoken about it.
        language: String,
    },
    /// Write the 911 audit row; [`Input::Audited`] follows.
    AuditStart(Box<EmergencyAudit>),
    /// Record the 911 outcome on the audit row.
    AuditOutcome {
        id: i64,
        outcome: String,
    },
    /// Count a 911 redirect by method and outcome.
    CountEmergency {
        method: &'static str,
        outcome: &'static str,
    },
    Queue(QueueCommand),
    /// Take one of the number's daily call-backs; [`Input::CallbackClaimed`] follows.
    ClaimCallback(CallbackNumber),
    /// Hand the caller's queue entry to a call-back; [`Input::CallbackKept`] follows.
    KeepPlace(Box<CallbackRequest>),
    /// File a ticket flagged for call-back; [`Input::CallbackFiled`] follows.
    FileCallbackTicket(Box<NewTicket>),
    /// The registry shows this language and state for the call.
    Show {
        language: String,
        state: String,
    },
    /// The registry shows who the caller is talking to: the agent, on the leg (for their
    /// phone's calls that name it), and the caller's context for those calls.
    ShowOperator(Option<OperatorView>),
    /// The answer to [`Input::AdminTransfer`]: the transfer's id, or a refusal (HTTP status
    /// and why).
    AdminTransferAnswer(Result<TransferId, (u16, String)>),
    /// The answer to [`Input::QueueByPhone`]: the queue took the caller, or why not (the SIP
    /// status for the operator's call, and why).
    QueueByPhoneAnswer(Result<(), (u16, String)>),
    /// A transfer's progress, as `/admin/transfers/{id}` shows it.
    ShowTransfer(TransferView),
    /// Write the call's record of a transfer that started.
    RecordTransfer(TransferView),
    /// A transfer ended: its record's outcome, and (connected) what the call's tickets note.
    TransferOutcome {
        record: crate::dispatch::tickets::TransferRecord,
        outcome: String,
        ticket_note: Option<String>,
    },
    /// Count a transfer by target kind and outcome (`ivr311_transfers_total`).
    CountTransfer {
        kind: &'static str,
        outcome: &'static str,
    },
    /// Count a transfer request refused, by reason (`ivr311_transfer_refusals_total`).
    CountRefusal(&'static str),
    /// Ask operator `agent`'s consultation on `dialog` for its target (an attended transfer);
    /// answer with [`Input::ConsultJoined`] (the target's legs join the call's).
    JoinConsult {
        dialog: crate::sip::ua::DialogId,
        agent: String,
    },
    /// The call is over; nothing follows.
    End(EndReason),
}

/// The call's timers, in the order they are looked at when several are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// The operator's leg: its ring deadline, or its silence probe's.
    Operator = 0,
    /// The menu's single timer (a key's wait).
    Menu = 1,
    /// The 911 redirect's current method.
    Emergency = 2,
    /// A transfer's target: its first response, its ring timeout (or its 911 redirect's).
    Transfer = 3,
    /// `limits.max_call_seconds`.
    MaxCall = 4,
}

const TIMERS: [Timer; 5] = [
    Timer::Operator,
    Timer::Menu,
    Timer::Emergency,
    Timer::Transfer,
    Timer::MaxCall,
];

/// When each [`Timer`] fires.
#[derive(Debug, Default, Clone, Copy)]
struct Timers([Option<Instant>; 5]);

impl Timers {
    fn get(&self, t: Timer) -> Option<Instant> {
        self.0[t as usize]
    }

    fn set(&mut self, t: Timer, at: Option<Instant>) {
        self.0[t as usize] = at;
    }

    fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}

/// A caller in an operator queue.
#[derive(Debug)]
pub(crate) struct Queued {
    name: String,
    /// The skill the queue matches operators on (the caller's language unless the menu
    /// says).
    skill: Option<String>,
    /// When the caller first joined a queue (a transfer or a return to the front keeps it).
    entered: Instant,
    menu_path: String,
    /// The operator leg: ringing, or answered.
    operator: Option<OperatorLeg>,
    /// The agent the caller is talking to.
    connected: Option<String>,
    /// A transfer the operator asked for, going on beside their leg.
    transfer: Option<Box<Transfer>>,
}

/// A caller transferred to a line (`transfers` entry): bridged to it until either hangs up.
#[derive(Debug)]
pub(crate) struct LineCall {
    leg: OperatorLeg,
    name: String,
}

/// Who the caller is talking to, for the registry (their phone's own calls find the caller
/// by it).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OperatorView {
    pub(crate) agent: String,
    /// The operator's leg.
    pub(crate) leg: LegId,
    /// The caller's number, and whether a trusted trunk asserted it.
    pub(crate) number: String,
    pub(crate) asserted: bool,
    /// The `X-311-*` headers of the caller's context.
    pub(crate) context: Vec<(String, String)>,
    pub(crate) language: String,
    pub(crate) queue: String,
    pub(crate) menu_path: String,
    pub(crate) entered: Instant,
}

/// A transfer as `/admin/transfers/{id}` shows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TransferView {
    pub(crate) id: TransferId,
    pub(crate) call_id: String,
    /// `911`, a line's name, `agent:<id>`, `queue:<name>`.
    pub(crate) target: String,
    pub(crate) via: &'static str,
    pub(crate) operator: Option<String>,
    /// `calling`, `ringing`, `calling 911`, ..., then `connected`, `failed: <why>`.
    pub(crate) state: String,
    /// Where the caller is now (`with operator`, `transferred`, `waiting for operator`...).
    pub(crate) caller: String,
    pub(crate) started: Instant,
    pub(crate) done: bool,
}

/// What the call is doing.
#[derive(Debug)]
pub(crate) enum Phase {
    /// In the menu.
    Menu,
    /// Waiting for an operator, being offered to one, or talking to one.
    Queue(Box<Queued>),
    /// Being sent to 911 (to the end of the call).
    Emergency(Box<Emergency>),
    /// Transferred to a line (to the end of the call).
    Line(Box<LineCall>),
}

/// The caller's side of the call as answered: our media address, the SDP session, and what
/// was agreed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallerMedia {
    pub(crate) local: SocketAddr,
    pub(crate) session_id: u64,
    pub(crate) neg: Negotiated,
}

/// The recording of the caller, as far as the core knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recording {
    Off,
    On,
}

/// One call (see the module docs).
pub(crate) struct CallCore {
    config: Arc<CoreConfig>,
    /// The menu and prompts this call started on (a reload does not change them).
    menu: Arc<ActiveMenu>,
    meta: CallMeta,
    /// The caller's queue entry id (the registry's id for the call).
    caller_id: CallerId,
    engine: Engine,
    /// Text spoken for this call (the looked-up request's notes and date), by the engine's
    /// placeholder names (`@notes`, `@filed`); replaced by each lookup.
    spoken: Vec<(String, Arc<Prompt>)>,
    media: CallerMedia,
    /// Our SDP's version on the caller's dialog.
    version: u64,
    /// Our 2xx to the caller's re-INVITE without SDP carried our offer: the ACK answers it.
    answer_in_ack: bool,
    /// Prompts are queued or playing.
    playing: bool,
    recording: Recording,
    phase: Phase,
    timers: Timers,
    legs: LegIds,
    next_req: u64,
    /// REFERs accepted on the operator leg so far, and the `Event` id of the NOTIFYs of the
    /// latest (its CSeq, from the second REFER of a dialog on).
    refers: (Option<LegId>, u32, Option<u32>),
    /// The menu's inputs not yet handled.
    inputs: VecDeque<engine::Input>,
    /// Keys pressed while waiting for an operator.
    queued_keys: VecDeque<char>,
    /// Hang up (for this reason) once the prompts queued now have played.
    hangup_after_play: Option<EndReason>,
    /// End once the menu has reacted to this input.
    end: Option<EndReason>,
    /// Ending: waiting for the recording to close (then the abandoned ticket is filed).
    ending: Option<EndReason>,
    ended: bool,
    /// What the call achieved, for metrics: ticket, operator, emergency, info.
    outcome: Option<&'static str>,
    /// A waiting caller's call-back request is being taken (its daily count, then the
    /// call-back or its ticket): they stay in the queue until it is durable.
    callback_filing: bool,
    /// The server's drain time is over (the goodbye is said once).
    closing: bool,
    /// (language, state) last shown in the registry.
    shown: (String, String),
    /// The bridge the driver was last told of.
    bridged: Option<BridgeTo>,
    /// The queue asked for and the menu path, until the queue answers.
    pending_queue: Option<(String, String)>,
    /// The queue's announcement (consent to recording) plays: the caller is enqueued when it
    /// ends, whatever keys they press meanwhile (but 9, still 911).
    announcing: Option<QueueCommand>,
    /// The number a call-back was asked for, until the call-backs answer.
    pending_callback: Option<CallbackNumber>,
    /// The skill asked for with `pending_queue`.
    pending_skill: Option<String>,
    /// A return to the front of a queue asked for, until the queue answers: for a transfer
    /// to that queue (`true`), or after a transfer failed with the operator gone.
    pending_rejoin: Option<(String, bool)>,
    /// What the operator consults from their phone meanwhile (for `/admin/calls`).
    consulting: Option<String>,
    /// An attended transfer waits for the consulted party to be handed over.
    joining: bool,
    /// The transfer to a queue the operator asked for by dialling its name, until it ends
    /// (the operator's call is answered then).
    by_phone: Option<TransferId>,
    /// Where the caller was placed by the latest return to a queue.
    rejoined_at: Option<Position>,
    /// The operator the registry was last told of.
    shown_operator: Option<OperatorView>,
    /// The transfer state last shown (id, state).
    shown_transfer: Option<(TransferId, String)>,
    actions: VecDeque<Action>,
    /// The announcements this call hears, and their audio.
    announcements: Arc<crate::dispatch::announcements::Snapshot>,
}

impl CallCore {
    /// A call answered at `now`: the menu starts with the first [`CallCore::handle`] (or
    /// [`CallCore::start`]).
    pub(crate) fn new(
        now: Instant,
        config: Arc<CoreConfig>,
        menu: Arc<ActiveMenu>,
        meta: CallMeta,
        caller_id: CallerId,
        media: CallerMedia,
    ) -> CallCore {
        let engine = Engine::new(menu.file.clone(), menu.main.clone()).with_calendar(
            menu.schedules.clone(),
            now,
            meta.answered_at,
        );
        let mut timers = Timers::default();
        timers.set(
            Timer::MaxCall,
            Some(now + Duration::from_secs(config.limits.max_call_seconds)),
        );
        CallCore {
            config,
            menu,
            meta,
            caller_id,
            engine,
            media,
            version: 1,
            answer_in_ack: false,
            playing: false,
            spoken: Vec::new(),
            recording: Recording::Off,
            phase: Phase::Menu,
            timers,
            legs: LegIds,
            next_req: 1,
            refers: (None, 0, None),
            inputs: VecDeque::from([engine::Input::Start]),
            queued_keys: VecDeque::new(),
            hangup_after_play: None,
            end: None,
            ending: None,
            ended: false,
            outcome: None,
            callback_filing: false,
            closing: false,
            shown: (String::new(), String::new()),
            bridged: None,
            pending_queue: None,
            announcing: None,
            pending_callback: None,
            pending_skill: None,
            pending_rejoin: None,
            consulting: None,
            joining: false,
            by_phone: None,
            rejoined_at: None,
            shown_operator: None,
            shown_transfer: None,
            actions: VecDeque::new(),
            announcements: Arc::default(),
        }
    }

    /// Start the menu.
    pub(crate) fn start(&mut self, now: Instant) {
        self.settle(now);
    }

    /// The next thing to do, in order.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`CallCore::handle_timeout`] must be called next.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.ended || self.ending.is_some() {
            return None;
        }
        self.timers.next()
    }

    /// What the call achieved, for the metrics at its end.
    pub(crate) fn outcome(&self) -> &'static str {
        let st = self.engine.stats();
        self.outcome
            .or(st.heard_info.then_some("info"))
            .unwrap_or("abandoned")
    }

    /// The menu's statistics, for the metrics at the call's end.
    pub(crate) fn menu_stats(&self) -> &EngineStats {
        self.engine.stats()
    }

    /// How the caller got where they are (`language:1 > screening:1 > main:0`).
    pub(crate) fn menu_path(&self) -> String {
        self.engine.menu_path()
    }

    /// Time passed: the timers due at `now` fire, in [`Timer`] order.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.ended || self.ending.is_some() {
            return;
        }
        for t in TIMERS {
            if self.timers.get(t).is_none_or(|at| now < at) {
                continue;
            }
            self.timers.set(t, None);
            match t {
                Timer::Operator => {
                    let step = match self.operator_mut() {
                        Some(leg) => leg.on_timeout(now),
                        None => continue,
                    };
                    self.operator_step(now, step);
                }
                Timer::Menu => self.inputs.push_back(engine::Input::Timeout),
                Timer::Emergency => {
                    if let Phase::Emergency(e) = &mut self.phase {
                        e.on_timeout(now, &mut self.legs);
                    }
                    self.drain_emergency();
                }
                Timer::Transfer => {
                    if let Phase::Queue(q) = &mut self.phase {
                        if let Some(t) = q.transfer.as_mut() {
                            t.on_timeout(now, &mut self.legs);
                        }
                    }
                    self.drain_transfer();
                }
                Timer::MaxCall => {
                    info!("call reached its maximum length; hanging up");
                    self.finish(now, EndReason::MaxDuration);
                }
            }
            if self.ended || self.ending.is_some() {
                return;
            }
        }
        self.settle(now);
    }

    /// Something happened to the call.
    pub(crate) fn handle(&mut self, now: Instant, input: Input) {
        if self.ended {
            return;
        }
        if let Some(reason) = self.ending {
            if let Input::RecordingClosed { media_url } = input {
                self.recording = Recording::Off;
                self.complete_end(now, reason, media_url);
            }
            return;
        }
        match input {
            Input::Dialog(ev) => self.on_dialog_event(now, ev),
            Input::DialogGone => self.finish(now, EndReason::SignallingTimeout),
            Input::Leg(id, ev) => self.on_leg_event(now, id, ev),
            Input::Placed(id, placed) => self.on_placed(now, id, placed),
            Input::Queue(ev) => self.on_queue_event(now, ev),
            Input::Enqueued(result) => self.on_enqueued(now, result),
            Input::Digit(d) => self.on_digit(d),
            Input::PlayDone => {
                self.playing = false;
                self.on_play_done(now);
            }
            Input::RecordingFailed => {
                self.recording = Recording::Off;
                self.inputs
                    .push_back(engine::Input::Recorded { media_url: None });
            }
            Input::RecordingEnded => self.stop_recording(),
            Input::RecordingClosed { media_url } => {
                self.recording = Recording::Off;
                self.inputs.push_back(engine::Input::Recorded { media_url });
            }
            Input::NoMedia => {
                info!(
                    seconds = self.config.limits.no_media_seconds,
                    "no media from the caller; hanging up"
                );
                self.finish(now, EndReason::NoMedia);
            }
            Input::LegSilent => {
                let silence = Duration::from_secs(self.config.limits.operator_silence_seconds);
                let step = match self.operator_mut() {
                    Some(leg) => leg.on_silent(now, silence),
                    None => return,
                };
                self.operator_step(now, step);
            }
            Input::LegMediaFailed(why) => {
                let step = match self.operator_mut() {
                    Some(leg) => leg.on_media_failed(&why),
                    None => return,
                };
                self.operator_step(now, step);
            }
            Input::Engine(i) => self.inputs.push_back(i),
            Input::Spoken(v) => self.spoken = v,
            Input::Audited(id) => {
                if let Some(e) = emergency_in(&mut self.phase) {
                    e.audited(now, id, &mut self.legs);
                }
                self.drain_emergency();
            }
            Input::CallbackClaimed(claimed, number) => self.callback_claimed(claimed, number),
            Input::CallbackKept(result) => self.callback_kept(result),
            Input::CallbackFiled(ok) => self.callback_filed(ok),
            Input::AdminHangup => {
                info!("hung up by an admin");
                self.finish(now, EndReason::Admin);
            }
            Input::AdminTransfer { to, via } => {
                let answer = self.admin_transfer(now, &to, via);
                self.actions.push_back(Action::AdminTransferAnswer(answer));
            }
            Input::QueueByPhone { agent, queue } => self.queue_by_phone(now, &agent, &queue),
            Input::RangDirect(result) => {
                if let Some(t) = self.transfer_mut() {
                    t.claimed(result);
                }
                self.drain_transfer();
            }
            Input::Rejoined(result) => self.on_rejoined(now, result),
            Input::Consulting(target) => self.consulting = target,
            Input::ConsultJoined(result) => self.consult_joined(result),
            Input::Closing => self.say_goodbye(now),
            Input::Shutdown => self.finish(now, EndReason::Shutdown),
        }
        self.settle(now);
    }

    /// Let the menu react to everything that happened, then tell the driver what changed.
    fn settle(&mut self, now: Instant) {
        if self.ended || self.ending.is_some() {
            return;
        }
        // Keys pressed while waiting come first: what they decide (1: leave the queue for a
        // ticket) is menu input, handled in this same pass.
        while let Some(d) = self.queued_keys.pop_front() {
            self.on_queued_key(d);
        }
        if self.hangup_after_play.is_some() {
            self.inputs.clear();
        }
        while let Some(input) = self.inputs.pop_front() {
            for o in self.engine.handle(now, input) {
                self.carry_out(now, o);
            }
        }
        if let Some(r) = self.end.take() {
            self.finish(now, r);
            return;
        }
        let state = self.state_name();
        if self.shown.0 != self.engine.language() || self.shown.1 != state {
            self.shown = (self.engine.language().to_owned(), state.to_owned());
            self.actions.push_back(Action::Show {
                language: self.shown.0.clone(),
                state: self.shown.1.clone(),
            });
        }
        // Bridged to another leg: the media clock relays both ways; the driver is only told
        // when the bridge starts, moves (early media, then the answer) and ends.
        let bridge = self.bridge_target();
        if bridge != self.bridged {
            self.bridged = bridge;
            self.actions.push_back(Action::SetBridge(bridge));
        }
        let operator = self.operator().and_then(OperatorLeg::next_deadline);
        self.timers.set(Timer::Operator, operator);
        let emergency = match &self.phase {
            Phase::Emergency(e) => e.next_deadline(),
            _ => None,
        };
        self.timers.set(Timer::Emergency, emergency);
        let transfer = self.transfer().and_then(|t| t.next_deadline());
        self.timers.set(Timer::Transfer, transfer);
        let view = self.operator_view(now);
        if view != self.shown_operator {
            self.shown_operator = view.clone();
            self.actions.push_back(Action::ShowOperator(view));
        }
        let view = self
            .transfer()
            .filter(|t| self.shown_transfer.as_ref() != Some(&(t.id, t.state_word().to_owned())))
            .map(|t| self.transfer_view(t));
        if let Some(view) = view {
            self.shown_transfer = Some((view.id, view.state.clone()));
            self.actions.push_back(Action::ShowTransfer(view));
        }
    }

    /// Who the caller talks to now, for the registry: an answered operator.
    fn operator_view(&self, now: Instant) -> Option<OperatorView> {
        let Phase::Queue(q) = &self.phase else {
            return None;
        };
        let leg = q.operator.as_ref().filter(|l| l.answered())?;
        let agent = q.connected.clone()?;
        let _ = now;
        let context = vec![
            (
                "X-311-Language".to_owned(),
                self.engine.language().to_owned(),
            ),
            ("X-311-Menu-Path".to_owned(), q.menu_path.clone()),
            ("X-311-Queue".to_owned(), q.name.clone()),
            ("X-311-Call-ID".to_owned(), self.meta.call_id.clone()),
        ];
        Some(OperatorView {
            agent,
            leg: leg.id,
            number: self.meta.caller.clone(),
            asserted: self.meta.identity.asserted().is_some(),
            context,
            language: self.engine.language().to_owned(),
            queue: q.name.clone(),
            menu_path: q.menu_path.clone(),
            entered: q.entered,
        })
    }

    /// A transfer, as `/admin/transfers/{id}` shows it.
    fn transfer_view(&self, t: &Transfer) -> TransferView {
        TransferView {
            id: t.id,
            call_id: self.meta.call_id.clone(),
            target: t.target.clone(),
            via: t.via.as_str(),
            operator: t.operator.clone(),
            state: t.state_word().to_owned(),
            caller: self.state_name().to_owned(),
            started: t.started,
            done: t.is_done(),
        }
    }

    /// Where the caller's bridge goes: the answered operator, or the 911 leg (its early
    /// media, then its answer).
    fn bridge_target(&self) -> Option<BridgeTo> {
        match &self.phase {
            Phase::Menu => None,
            // While a transfer's target rings: its early media, or nothing (our ringback).
            Phase::Queue(q) if q.transfer.is_some() => q.transfer.as_ref()?.bridge(),
            Phase::Line(l) => Some(BridgeTo {
                leg: l.leg.id,
                media: l.leg.media()?,
                scope: l.leg.scope(),
                answered: true,
                operator: false,
                record: false,
            }),
            Phase::Queue(q) => {
                let leg = q.operator.as_ref()?;
                Some(BridgeTo {
                    leg: leg.id,
                    media: leg.media()?,
                    scope: leg.scope(),
                    answered: true,
                    operator: true,
                    record: self.config.recorded_queues.contains(&q.name),
                })
            }
            Phase::Emergency(e) => e.bridge(),
        }
    }

    /// Whether the caller is bridged to an answered leg (operator, a line or 911), or being
    /// transferred (not to be talked over either).
    fn bridged(&self) -> bool {
        match &self.phase {
            Phase::Menu => false,
            Phase::Queue(q) if q.transfer.is_some() => true,
            Phase::Queue(q) => q.operator.as_ref().is_some_and(OperatorLeg::answered),
            Phase::Emergency(e) => e.connected(),
            Phase::Line(l) => l.leg.answered(),
        }
    }

    /// Whether the leg the caller is bridged to holds the call.
    fn leg_holds(&self) -> bool {
        match &self.phase {
            Phase::Menu => false,
            Phase::Queue(q) if q.transfer.is_some() => false,
            Phase::Queue(q) => q.operator.as_ref().is_some_and(OperatorLeg::holds),
            Phase::Emergency(e) => e.holds(),
            Phase::Line(l) => l.leg.holds(),
        }
    }

    fn transfer(&self) -> Option<&Transfer> {
        match &self.phase {
            Phase::Queue(q) => q.transfer.as_deref(),
            _ => None,
        }
    }

    fn transfer_mut(&mut self) -> Option<&mut Transfer> {
        match &mut self.phase {
            Phase::Queue(q) => q.transfer.as_deref_mut(),
            _ => None,
        }
    }

    fn operator(&self) -> Option<&OperatorLeg> {
        match &self.phase {
            Phase::Queue(q) => q.operator.as_ref(),
            _ => None,
        }
    }

    fn operator_mut(&mut self) -> Option<&mut OperatorLeg> {
        match &mut self.phase {
            Phase::Queue(q) => q.operator.as_mut(),
            _ => None,
        }
    }

    fn queued(&self) -> Option<&Queued> {
        match &self.phase {
            Phase::Queue(q) => Some(q),
            _ => None,
        }
    }

    /// What the admin view shows as the call's state.
    fn state_name(&self) -> &str {
        match &self.phase {
            Phase::Emergency(_) => "emergency",
            Phase::Line(_) => "transferred",
            Phase::Queue(q) if q.transfer.is_some() || self.joining => "transferring",
            Phase::Queue(q) if q.connected.is_some() && self.consulting.is_some() => "consulting",
            Phase::Queue(q) if q.connected.is_some() => "with operator",
            Phase::Queue(_) => "waiting for operator",
            Phase::Menu if self.recording == Recording::On => "recording",
            Phase::Menu => self.engine.current_menu().unwrap_or("in menu"),
        }
    }

    // ---- media -------------------------------------------------------------------------

    /// The line the caller dialled (its configured number, or `default`).
    pub(crate) fn line(&self) -> &str {
        &self.meta.line
    }

    /// The prompts `names`, in the caller's language (else the default one); a missing one is
    /// skipped (and logged).
    fn prompts(&self, names: &[&str]) -> Vec<Arc<Prompt>> {
        let lang = self.engine.language();
        names
            .iter()
            .filter_map(|n| {
                if n.starts_with(crate::menu::bulletin::PROMPT_PREFIX) {
                    return self.announcement_prompt(lang, n);
                }
                if n.starts_with(crate::menu::say::SPOKEN) {
                    // Speech that could not be rendered is left out: the recorded words
                    // around it are said (the failure was logged where it happened).
                    return (self.spoken.iter())
                        .find(|(k, _)| k == n)
                        .map(|(_, p)| p.clone());
                }
                let p = (self.menu.prompts.get(lang, n))
                    .or_else(|| self.menu.prompts.get(&self.config.default_language, n));
                if p.is_none() {
                    warn!(prompt = %n, language = %lang, "prompt missing; skipped");
                }
                p
            })
            .collect()
    }

    /// An announcement's audio in the caller's language (else another it has), or the
    /// recorded fallback when it has none that can be played.
    fn announcement_prompt(&self, lang: &str, name: &str) -> Option<Arc<Prompt>> {
        let found = (self.announcements).prompt(lang, &self.config.default_language, name);
        if found.is_none() {
            warn!(prompt = %name, language = %lang, "announcement audio missing; fallback played");
        }
        found.or_else(|| {
            (self.menu.prompts.get(lang, "announcement_fallback")).or_else(|| {
                self.menu
                    .prompts
                    .get(&self.config.default_language, "announcement_fallback")
            })
        })
    }

    /// The city's announcements this call hears (taken as it is answered).
    pub(crate) fn with_announcements(
        mut self,
        snapshot: Arc<crate::dispatch::announcements::Snapshot>,
    ) -> CallCore {
        self.engine.set_bulletins(snapshot.bulletins.clone());
        self.announcements = snapshot;
        self
    }

    fn play(&mut self, prompts: Vec<Arc<Prompt>>) {
        if !prompts.is_empty() {
            self.playing = true;
            self.actions.push_back(Action::Play(prompts));
        }
    }

    fn play_names(&mut self, names: &[&str]) {
        let p = self.prompts(names);
        self.play(p);
    }

    fn stop_playback(&mut self) {
        self.playing = false;
        self.actions.push_back(Action::StopPlayback);
    }

    /// Hold music, unless something plays already.
    fn hold_music_if_quiet(&mut self) {
        if !self.playing {
            self.play_names(&["hold_music"]);
        }
    }

    fn on_play_done(&mut self, now: Instant) {
        if let Some(enqueue) = self.announcing.take() {
            // The announcement was heard in full: now the queue may offer the caller.
            self.actions.push_back(Action::Queue(enqueue));
            return;
        }
        if self.leg_holds() {
            // Hold music, looped, while the far end holds the call.
            self.play_names(&["hold_music"]);
            return;
        }
        if let Some(e) = emergency_in(&mut self.phase) {
            e.played(now, &mut self.legs);
            self.drain_emergency();
            return;
        }
        if let Some(t) = self.transfer() {
            // Ringback, looped, while the transfer's target rings.
            if t.wants_ringback() {
                self.play(vec![ringback()]);
            }
            return;
        }
        if matches!(self.phase, Phase::Line(_)) {
            return;
        }
        if let Some(r) = self.hangup_after_play {
            self.end = Some(r);
            return;
        }
        if let Phase::Queue(q) = &self.phase {
            if q.connected.is_none() {
                // Hold music, looped, between announcements.
                self.play_names(&["hold_music"]);
            }
            return;
        }
        self.inputs.push_back(engine::Input::PlayDone);
    }

    /// After the bridged leg's media changed: the caller hears hold music while the far end
    /// holds the call, and the far end again once it takes the call off hold.
    fn hold_changed(&mut self, was_held: bool, held: bool) {
        if held && !was_held {
            info!("the far end holds the call; the caller hears hold music");
            self.stop_playback();
            self.play_names(&["hold_music"]);
        } else if was_held && !held {
            info!("the far end took the call off hold");
            self.stop_playback();
        }
    }

    // ---- the caller's dialog ----------------------------------------------------------

    fn on_dialog_event(&mut self, now: Instant, ev: DialogEvent) {
        match ev {
            DialogEvent::Confirmed { sdp } => {
                // The ACK: the caller is there, and our stream may start (if its media has
                // not started it already).
                self.actions.push_back(Action::ConfirmMedia);
                // Our 2xx to a re-INVITE without SDP carried our offer; this is the answer.
                if std::mem::take(&mut self.answer_in_ack) && !sdp.is_empty() {
                    match super::leg::leg_answer(&sdp) {
                        Ok((neg, addr)) => {
                            self.media.neg = neg;
                            self.actions.push_back(Action::Renegotiate((neg, addr)));
                            info!(direction = ?neg.direction, "media renegotiated (answer in ACK)");
                        }
                        Err(e) => {
                            warn!(error = %e, "unusable answer in the ACK; the media stays as it was")
                        }
                    }
                }
            }
            DialogEvent::Cancelled => self.finish(now, EndReason::Cancelled),
            DialogEvent::Bye => self.finish(now, EndReason::CallerHungUp),
            DialogEvent::Timeout | DialogEvent::Lost => {
                self.finish(now, EndReason::SignallingTimeout)
            }
            // The driver turns INFO keys into `Input::Digit`; other INFO means nothing here.
            DialogEvent::Info { .. } => {}
            DialogEvent::Reoffer { txn, body, .. } => {
                self.version += 1;
                self.answer_in_ack = body.is_empty();
                match self.reoffer(&body) {
                    Ok(sdp) => self.actions.push_back(Action::ReplyCaller {
                        txn,
                        code: 200,
                        body: Some(("application/sdp".into(), Bytes::from(sdp))),
                    }),
                    Err(e) => {
                        warn!(error = %e, "re-offer refused; 488 and the call goes on");
                        self.actions.push_back(Action::ReplyCaller {
                            txn,
                            code: 488,
                            body: None,
                        });
                    }
                }
            }
            DialogEvent::RequestOutcome { method, code, .. } => {
                if method == Method::Refer {
                    if let Some(e) = emergency_in(&mut self.phase) {
                        e.refer_answered(now, code, &mut self.legs);
                    }
                    self.drain_emergency();
                }
            }
            DialogEvent::Notify { event, body } => {
                if event.to_ascii_lowercase().starts_with("refer") {
                    if let Some(e) = emergency_in(&mut self.phase) {
                        e.refer_notify(now, &body, &mut self.legs);
                    }
                    self.drain_emergency();
                }
            }
            DialogEvent::Refer(r) => {
                // Callers cannot make the city's server dial out.
                info!("REFER from the caller's side refused");
                self.refuse_refer(
                    None,
                    r.txn,
                    403,
                    "not_operator",
                    "only an operator can transfer the call",
                );
            }
        }
    }

    /// Answer the caller's re-INVITE/UPDATE offer: new direction (hold), address or codec.
    fn reoffer(&mut self, body: &[u8]) -> Result<String, sdp::SdpError> {
        let m = self.media;
        if body.is_empty() {
            // No offer: we offer what we have (RFC 3261 §14.2); the ACK carries the answer.
            return Ok(sdp::build_answer(
                m.local,
                m.session_id,
                self.version,
                &m.neg,
            ));
        }
        let offer = sdp::parse(body)?;
        let neg = sdp::negotiate(&offer, &SUPPORTED_CODECS)?;
        self.media.neg = neg;
        self.actions
            .push_back(Action::Renegotiate((neg, offer.addr)));
        info!(direction = ?neg.direction, "media renegotiated");
        sdp::build_answer_for_offer(body, m.local, m.session_id, self.version, &neg)
    }

    // ---- the menu ---------------------------------------------------------------------

    fn on_digit(&mut self, d: char) {
        match &self.phase {
            Phase::Emergency(_) => {} // a 911 redirect is not interrupted by keys
            Phase::Line(_) => {}      // the bridge relays them to the line
            Phase::Queue(q) if q.transfer.is_some() => {} // nor is a transfer
            _ if self.hangup_after_play.is_some() => {} // nor are the last words
            // Nor the queue's announcement, but 9 still reaches 911.
            Phase::Menu if self.announcing.is_some() => {
                if d == '9' {
                    self.announcing = None;
                    self.pending_queue = None;
                    let path = format!("{} > queue:9", self.engine.menu_path());
                    self.outcome = Some("emergency");
                    self.start_emergency(
                        Some("caller pressed 9 during the queue's announcement".into()),
                        path,
                    );
                }
            }
            Phase::Queue(_) => self.queued_keys.push_back(d),
            Phase::Menu => self.inputs.push_back(engine::Input::Digit(d)),
        }
    }

    /// Carry out one engine output.
    fn carry_out(&mut self, now: Instant, o: Output) {
        match o {
            Output::Play(names) => {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let prompts = self.prompts(&names);
                if prompts.is_empty() && !self.playing {
                    self.inputs.push_back(engine::Input::PlayDone);
                }
                self.play(prompts);
            }
            Output::StopPlayback => self.stop_playback(),
            Output::Timer(d) => self.timers.set(Timer::Menu, d.map(|d| now + d)),
            Output::StartRecording { max, silence } => {
                self.recording = Recording::On;
                self.actions
                    .push_back(Action::StartRecording { max, silence });
            }
            Output::StopRecording => self.stop_recording(),
            Output::FileTicket(t) => {
                self.outcome = Some("ticket");
                self.file_ticket(t, true)
            }
            Output::LookupTicket(id) => {
                self.outcome.get_or_insert("info");
                let language = self.engine.language().to_owned();
                self.actions
                    .push_back(Action::LookupTicket { id, language });
            }
            Output::Emergency { reason, menu_path } => {
                self.outcome = Some("emergency");
                self.start_emergency(reason, menu_path)
            }
            Output::Transfer {
                to,
                announce,
                menu_path,
            } => {
                self.outcome = Some("transfer");
                self.start_line_redirect(to, announce, menu_path)
            }
            Output::Queue {
                queue,
                skill,
                menu_path,
                entered,
            } => {
                self.outcome.get_or_insert("operator");
                self.enter_queue(queue, skill, menu_path, entered);
            }
            Output::FindDuplicate {
                service_code,
                zipcode,
                days,
            } => self.actions.push_back(Action::FindDuplicate {
                service_code,
                zipcode,
                days,
            }),
            Output::JoinRequest(id) => {
                self.outcome = Some("ticket");
                self.actions.push_back(Action::JoinRequest(id));
            }
            Output::Language(l) => info!(language = %l, "language chosen"),
            Output::Hangup => self.end = Some(EndReason::MenuHungUp),
        }
    }

    fn stop_recording(&mut self) {
        if self.recording == Recording::On {
            self.actions
                .push_back(Action::CloseRecording { report: true });
        }
    }

    /// Commit a ticket; report to the menu when `report` (not after hang-up).
    fn file_ticket(&mut self, t: TicketRequest, report: bool) {
        let house_number = t.field("house_number").map(str::to_owned);
        let ticket = NewTicket {
            address: phone_address(house_number.as_deref(), t.field("zipcode")),
            house_number,
            zipcode: t.field("zipcode").map(str::to_owned),
            address_id: t.field("address").map(str::to_owned),
            service_code: t.service_code,
            service_name: t.service_name,
            description: t.description,
            agency_responsible: t.agency,
            phone: Some(self.meta.caller.clone()),
            recording: t.media_url,
            channel: Channel::Phone,
            language: Some(t.language),
            call_id: Some(self.meta.call_id.clone()),
            ..NewTicket::default()
        };
        self.actions.push_back(Action::FileTicket {
            ticket: Box::new(ticket),
            report,
        });
    }

    /// The server is closing after its drain time: tell the caller, then hang up. A caller
    /// talking to an operator or 911 is not talked over: that call ends at the final stop.
    fn say_goodbye(&mut self, now: Instant) {
        if self.closing {
            return;
        }
        self.closing = true;
        if matches!(self.phase, Phase::Emergency(_)) || self.bridged() {
            return;
        }
        info!("server closing; saying goodbye");
        let p = self.prompts(&["shutdown_goodbye"]);
        self.stop_playback();
        if p.is_empty() {
            self.finish(now, EndReason::Shutdown);
            return;
        }
        self.play(p);
        self.timers.set(Timer::Menu, None);
        self.hangup_after_play = Some(EndReason::Shutdown);
    }

    // ---- 911 --------------------------------------------------------------------------

    fn start_emergency(&mut self, reason: Option<String>, menu_path: String) {
        let caller = self.redirected_caller();
        let e = Emergency::start(&self.config.emergency, caller, reason, menu_path);
        self.begin_redirect(e);
    }

    /// A menu's `transfer` to the crisis line `to`: the 911 redirect's machine with the
    /// line's URI as its route (refer or bridge as `emergency.method` says, then the
    /// announcement). A name that is not a `transfers` entry marked `crisis: true` goes
    /// straight to the announcement (audited as such).
    fn start_line_redirect(&mut self, to: String, announce: Option<String>, menu_path: String) {
        let caller = self.redirected_caller();
        let base = &self.config.emergency;
        let config = match self.config.dialplan.crisis_line(&to) {
            Some(line) => EmergencyConfig {
                method: base.method,
                uri: Some(line.uri.clone()),
                backup_uris: Vec::new(),
                announce_repeats: base.announce_repeats,
                timeout_seconds: line.ring_timeout_seconds,
            },
            None => {
                warn!(line = %to, "the menu transfers to a line that is not a crisis entry of `transfers`; announcing");
                EmergencyConfig {
                    announce_repeats: base.announce_repeats,
                    ..EmergencyConfig::default()
                }
            }
        };
        let line = emergency::LineRedirect {
            name: to,
            announce: announce.unwrap_or_else(|| "transfer_unreachable".into()),
        };
        let e = Emergency::to_line(&config, caller, line, menu_path);
        self.begin_redirect(e);
    }

    fn redirected_caller(&self) -> Caller {
        Caller {
            call_id: self.meta.call_id.clone(),
            number: self.meta.caller.clone(),
            asserted: self.meta.identity.asserted().map(str::to_owned),
            line: self.config.callback.from_user.clone(),
            language: self.engine.language().to_owned(),
            codec: self.media.neg.codec,
            local_ip: self.media.local.ip(),
        }
    }

    fn begin_redirect(&mut self, e: Emergency) {
        self.timers.set(Timer::Menu, None);
        self.phase = Phase::Emergency(Box::new(e));
        // What was recorded is kept (the file), but nothing more is.
        if self.recording == Recording::On {
            self.recording = Recording::Off;
            self.actions
                .push_back(Action::CloseRecording { report: false });
        }
        self.drain_emergency();
    }

    /// Carry out what the 911 redirect asks (the menu's, or a transfer's).
    fn drain_emergency(&mut self) {
        if self.transfer().is_some() {
            self.drain_transfer();
            return;
        }
        loop {
            let Phase::Emergency(e) = &mut self.phase else {
                return;
            };
            let Some(out) = e.poll() else { return };
            self.emergency_out(out);
            if self.ended || self.ending.is_some() {
                return;
            }
        }
    }

    /// Carry out one thing a 911 redirect asks.
    fn emergency_out(&mut self, out: emergency::Out) {
        {
            match out {
                emergency::Out::Play(sound) => {
                    let line = match &self.phase {
                        Phase::Emergency(e) => e.line().map(|l| l.announce.clone()),
                        _ => None,
                    };
                    let p = match (sound, line) {
                        (Sound::Notice, None) => self.prompts(&["connecting_911"]),
                        (Sound::Notice, Some(_)) => self.prompts(&["connecting_transfer"]),
                        (Sound::Announcement, None) => self.prompts(&["emergency_announce"]),
                        (Sound::Announcement, Some(a)) => self.prompts(&[a.as_str()]),
                        (Sound::Ringback, _) => vec![ringback()],
                    };
                    self.play(p);
                }
                emergency::Out::Stop => self.stop_playback(),
                emergency::Out::WriteAudit(a) => {
                    self.actions.push_back(Action::AuditStart(Box::new(a)))
                }
                emergency::Out::AuditOutcome { id, outcome } => {
                    self.actions.push_back(Action::AuditOutcome { id, outcome })
                }
                emergency::Out::Counted { method, outcome } => {
                    // `ivr311_emergency_redirects_total` counts 911 only.
                    if !matches!(&self.phase, Phase::Emergency(e) if e.line().is_some()) {
                        self.actions
                            .push_back(Action::CountEmergency { method, outcome })
                    }
                }
                emergency::Out::Refer { headers } => {
                    let req = self.next_req;
                    self.next_req += 1;
                    self.actions.push_back(Action::RequestCaller {
                        req,
                        method: Method::Refer,
                        headers,
                    });
                }
                emergency::Out::Place(p) => self.actions.push_back(Action::PlaceLeg(p)),
                emergency::Out::DropLeg { leg, hang_up } => {
                    let how = if hang_up {
                        LegEnd::HangUp
                    } else {
                        LegEnd::Forget
                    };
                    self.actions.push_back(Action::DropLeg { leg, how });
                }
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
                emergency::Out::Held(held) => self.hold_changed(!held, held),
                emergency::Out::End => self.end = Some(EndReason::Emergency),
                // Only a transfer's redirect returns the caller; the transfer takes it.
                emergency::Out::BackToOperator => {}
            }
        }
    }

    // ---- legs -------------------------------------------------------------------------

    fn on_placed(&mut self, now: Instant, id: LegId, placed: Result<Placed, NotPlaced>) {
        match &mut self.phase {
            Phase::Emergency(e) => {
                e.placed(now, id, placed, &mut self.legs);
                self.drain_emergency();
            }
            Phase::Queue(q) if q.operator.as_ref().is_none_or(|l| l.id != id) => {
                if let Some(t) = q.transfer.as_mut() {
                    t.placed(now, id, placed, &mut self.legs);
                }
                self.drain_transfer();
            }
            Phase::Queue(q) => {
                let Some(leg) = q.operator.as_mut().filter(|l| l.id == id) else {
                    return;
                };
                match placed {
                    Ok(p) => leg.placed(now, p.sdp, p.toward),
                    Err(why) => {
                        let agent = leg.agent.clone();
                        match why {
                            NotPlaced::NoPhone => {
                                warn!(%agent, "offered an operator who has no registered phone")
                            }
                            NotPlaced::NoPort => warn!("no RTP port for the operator leg"),
                        }
                        q.operator = None;
                        self.queue_offer_failed(&agent, OfferFailure::Unreachable);
                    }
                }
            }
            Phase::Menu | Phase::Line(_) => {}
        }
    }

    fn on_leg_event(&mut self, now: Instant, id: LegId, ev: Option<LegEvent>) {
        let operator = self.operator().is_some_and(|l| l.id == id);
        if let Some(LegEvent::Dialog(DialogEvent::Refer(r))) = &ev {
            if !operator {
                // A line, 911 or a ringing target: only the caller's operator transfers.
                info!(leg = %id, "REFER from a leg that is not the caller's operator refused");
                self.refuse_refer(
                    Some(id),
                    r.txn,
                    403,
                    "not_operator",
                    "only the caller's operator can transfer the call",
                );
                return;
            }
        }
        match &mut self.phase {
            Phase::Emergency(e) => {
                e.on_leg_event(now, id, ev, &mut self.legs);
                self.drain_emergency();
            }
            Phase::Queue(q) if !operator => {
                if let Some(t) = q.transfer.as_mut() {
                    t.on_leg_event(now, id, ev, &mut self.legs);
                }
                self.drain_transfer();
            }
            Phase::Queue(q) => {
                let Some(leg) = q.operator.as_mut().filter(|l| l.id == id) else {
                    return;
                };
                let step = leg.on_event(ev);
                self.operator_step(now, step);
            }
            Phase::Line(l) if l.leg.id == id => {
                let step = l.leg.on_event(ev);
                self.line_step(now, step);
            }
            Phase::Menu | Phase::Line(_) => {}
        }
    }

    // ---- operators --------------------------------------------------------------------

    fn enter_queue(
        &mut self,
        queue: String,
        skill: Option<String>,
        menu_path: String,
        entered: Option<engine::Entered>,
    ) {
        if !self.config.operators {
            info!(%queue, "operator requested; no operators are configured");
            self.inputs.push_back(engine::Input::QueueUnavailable);
            return;
        }
        // Callers are matched to operators who speak their language unless the menu says
        // otherwise.
        let skill = skill.or_else(|| Some(self.engine.language().to_owned()));
        let context = CallerContext {
            number: self.meta.caller.clone(),
            call_id: self.meta.call_id.clone(),
            language: self.engine.language().to_owned(),
            menu_path: menu_path.clone(),
            zipcode: entered
                .as_ref()
                .and_then(|e| e.field("zipcode"))
                .map(str::to_owned),
            service_code: entered.map(|e| e.service_code),
        };
        self.pending_queue = Some((queue.clone(), menu_path));
        self.pending_skill = skill.clone();
        let announcement = (self.config.queue_announcements.iter())
            .find(|(q, _)| *q == queue)
            .map(|(_, prompt)| self.prompts(&[prompt.as_str()]))
            .filter(|p| !p.is_empty());
        let enqueue = QueueCommand::Enqueue {
            queue,
            skill,
            context,
        };
        match announcement {
            Some(prompts) => {
                self.timers.set(Timer::Menu, None);
                self.stop_playback();
                self.play(prompts);
                self.announcing = Some(enqueue);
            }
            None => self.actions.push_back(Action::Queue(enqueue)),
        }
    }

    fn on_enqueued(&mut self, now: Instant, result: Result<Position, Refusal>) {
        let Some((queue, menu_path)) = self.pending_queue.take() else {
            return;
        };
        match result {
            Ok(pos) => {
                info!(%queue, place = pos.place, ewt = pos.ewt.as_secs(), "waiting for an operator");
                self.phase = Phase::Queue(Box::new(Queued {
                    name: queue,
                    skill: self.pending_skill.take(),
                    entered: now,
                    menu_path,
                    operator: None,
                    connected: None,
                    transfer: None,
                }));
                let mut p = vec!["operator_queue".to_owned()];
                p.extend(position_prompts(self.engine.language(), pos));
                let names: Vec<&str> = p.iter().map(String::as_str).collect();
                self.play_names(&names);
            }
            Err(why) => {
                info!(%queue, reason = %why, "no operator can take the call now");
                self.inputs.push_back(engine::Input::QueueUnavailable);
            }
        }
    }

    fn on_queue_event(&mut self, now: Instant, ev: QueueEvent) {
        match ev {
            QueueEvent::Offer {
                agent,
                ring_timeout,
            } => self.offer_agent(now, agent, ring_timeout),
            QueueEvent::CancelOffer { agent } => {
                let Phase::Queue(q) = &mut self.phase else {
                    return;
                };
                let ringing_this =
                    (q.operator.as_ref()).is_some_and(|l| l.agent == agent && l.ringing());
                if ringing_this {
                    self.drop_operator_leg();
                }
            }
            QueueEvent::Announce(pos) => {
                if self.queued().is_some_and(|q| q.connected.is_none()) {
                    self.stop_playback();
                    let p = position_prompts(self.engine.language(), pos);
                    let names: Vec<&str> = p.iter().map(String::as_str).collect();
                    self.play_names(&names);
                }
            }
            QueueEvent::MaxWait => {
                if self.queued().is_none() {
                    return;
                }
                info!("waited the longest allowed; offering a ticket instead");
                self.leave_queue();
                self.inputs.push_back(engine::Input::QueueUnavailable);
            }
        }
    }

    /// Keys pressed while waiting: 1 leaves the queue for a ticket, 2 asks for a call back,
    /// 9 is still 911.
    fn on_queued_key(&mut self, d: char) {
        match self.queued() {
            None => return,
            Some(q) if q.connected.is_some() => return, // keys were relayed to the operator
            Some(_) => {}
        }
        match d {
            '1' => {
                info!("caller left the queue to file a ticket");
                self.leave_queue();
                self.stop_playback();
                self.inputs.push_back(engine::Input::QueueUnavailable);
            }
            '2' => {
                info!("caller asked for a call back");
                if self.callback_filing {
                    return; // pressed again while the first request is being taken
                }
                // Only a number a trusted trunk asserted, of a kind the city calls, and not
                // past its call-backs for the day: anything else would have the city's trunk
                // (or its staff) dial whatever a caller wrote in From.
                match self.config.callback.callback_number(&self.meta.identity) {
                    Ok(number) => {
                        self.callback_filing = true;
                        self.actions.push_back(Action::ClaimCallback(number));
                    }
                    Err(why) => self.callback_unavailable(why),
                }
            }
            '9' => {
                self.leave_queue();
                let path = format!("{} > queue:9", self.engine.menu_path());
                self.outcome = Some("emergency");
                self.start_emergency(Some("caller pressed 9 while waiting".into()), path);
            }
            _ => {}
        }
    }

    /// Ring an operator's phone with the caller's number and context. One operator leg at a
    /// time: another offer while one rings (a `ring_all` round) is withdrawn, at no cost to
    /// its agent.
    fn offer_agent(&mut self, now: Instant, agent: String, ring_timeout: Duration) {
        let id = self.legs.next();
        let (codec, local_ip) = (self.media.neg.codec, self.media.local.ip());
        let language = self.engine.language().to_owned();
        let Phase::Queue(q) = &mut self.phase else {
            return;
        };
        if q.operator.is_some() {
            debug!(%agent, "already ringing an operator; offer withdrawn");
            self.actions
                .push_back(Action::Queue(QueueCommand::OfferWithdrawn(agent)));
            return;
        }
        let offer = OperatorOffer {
            language: &language,
            menu_path: &q.menu_path,
            queue: &q.name,
            waited: now.saturating_duration_since(q.entered).as_secs(),
            call_id: &self.meta.call_id,
            callback: false,
        };
        let span = tracing::info_span!("agent_leg", %agent);
        let (leg, place) = OperatorLeg::offer(
            id,
            agent,
            &self.meta.caller,
            &offer,
            codec,
            local_ip,
            ring_timeout,
            span,
        );
        q.operator = Some(leg);
        self.actions.push_back(Action::PlaceLeg(Box::new(place)));
    }

    /// Carry out what the operator's leg said.
    fn operator_step(&mut self, now: Instant, step: LegStep) {
        let Some(leg) = self.operator() else { return };
        let (id, agent) = (leg.id, leg.agent.clone());
        match step {
            LegStep::Nothing => {}
            LegStep::Answered => {
                self.stop_playback();
                if let Phase::Queue(q) = &mut self.phase {
                    q.connected = Some(agent.clone());
                }
                self.actions
                    .push_back(Action::Queue(QueueCommand::OfferAnswered(agent)));
            }
            LegStep::Unusable => {
                self.drop_operator_leg();
                self.queue_offer_failed(&agent, OfferFailure::NoCommonCodec);
            }
            LegStep::Failed(why) => {
                self.forget_operator_leg(LegEnd::Forget);
                self.queue_offer_failed(&agent, why);
            }
            LegStep::NoAnswer => {
                self.drop_operator_leg();
                self.queue_offer_failed(&agent, OfferFailure::NoAnswer);
            }
            LegStep::HungUp if self.transfer().is_some() => {
                self.operator_left_mid_transfer(LegEnd::Forget)
            }
            LegStep::HungUp => {
                self.forget_operator_leg(LegEnd::Forget);
                self.finish(now, EndReason::AgentHungUp);
            }
            LegStep::Reply {
                txn,
                code,
                body,
                change,
            } => {
                self.actions.push_back(Action::ReplyLeg {
                    leg: id,
                    txn,
                    code,
                    body,
                });
                // While a transfer goes on the caller hears its ringback, whatever the
                // operator's phone does with its own leg.
                if let (Some(MediaChange { was_held, held, .. }), None) = (change, self.transfer())
                {
                    self.hold_changed(was_held, held);
                }
            }
            LegStep::MediaChanged(c) => {
                if self.transfer().is_none() {
                    self.hold_changed(c.was_held, c.held)
                }
            }
            LegStep::Probe { req } => self.actions.push_back(Action::RequestLeg {
                leg: id,
                req,
                method: Method::Options,
                headers: Vec::new(),
                body: None,
            }),
            LegStep::StillThere => self.actions.push_back(Action::RearmLegWatch),
            LegStep::Gone { .. } if self.transfer().is_some() => {
                self.operator_left_mid_transfer(LegEnd::HangUpAndRelease)
            }
            LegStep::Gone { .. } => self.operator_gone(),
            LegStep::Lost if self.transfer().is_some() => {
                self.operator_left_mid_transfer(LegEnd::HangUpAndRelease)
            }
            LegStep::Lost => self.operator_lost(),
            LegStep::Refer(r) => self.on_operator_refer(now, id, agent, *r),
        }
    }

    /// The operator's browser is gone in the middle of the call (its connection closed and
    /// did not come back, or its media failed): the caller did not choose this, so it goes
    /// back in line where it stood (usually first) and hears hold music until the next
    /// operator answers. Ringing, it is an offer that failed.
    fn operator_lost(&mut self) {
        let Some(agent) = self.operator().map(|l| l.agent.clone()) else {
            return;
        };
        self.forget_operator_leg(LegEnd::HangUpAndRelease);
        let Phase::Queue(q) = &mut self.phase else {
            return;
        };
        if q.connected.take().is_none() {
            self.queue_offer_failed(&agent, OfferFailure::Unreachable);
            return;
        }
        info!(%agent, "the caller goes back to the front of the queue");
        self.actions
            .push_back(Action::Queue(QueueCommand::Requeue(agent)));
        self.stop_playback();
        self.play_names(&["hold_music"]);
    }

    /// The operator's phone left while their transfer goes on: the agent is free, the
    /// transfer carries on, and if it fails the caller goes to the front of the queue.
    fn operator_left_mid_transfer(&mut self, how: LegEnd) {
        info!("the operator hung up during the transfer; the transfer goes on");
        self.forget_operator_leg(how);
        if let Phase::Queue(q) = &mut self.phase {
            if let Some(agent) = q.connected.take() {
                self.actions
                    .push_back(Action::Queue(QueueCommand::CallEnded(agent)));
            }
        }
    }

    /// The line the caller was transferred to: its hold, re-offers, hang-up.
    fn line_step(&mut self, now: Instant, step: LegStep) {
        let Phase::Line(l) = &self.phase else { return };
        let id = l.leg.id;
        match step {
            LegStep::HungUp | LegStep::Gone { .. } | LegStep::Lost => {
                info!(line = %l.name, "the line the caller was transferred to hung up");
                if let Phase::Line(l) = &mut self.phase {
                    l.leg.drop_leg();
                }
                self.actions.push_back(Action::DropLeg {
                    leg: id,
                    how: LegEnd::Forget,
                });
                self.finish(now, EndReason::TargetHungUp);
            }
            LegStep::Reply {
                txn,
                code,
                body,
                change,
            } => {
                self.actions.push_back(Action::ReplyLeg {
                    leg: id,
                    txn,
                    code,
                    body,
                });
                if let Some(MediaChange { was_held, held, .. }) = change {
                    self.hold_changed(was_held, held);
                }
            }
            LegStep::MediaChanged(c) => self.hold_changed(c.was_held, c.held),
            LegStep::Refer(r) => self.refuse_refer(
                Some(id),
                r.txn,
                403,
                "not_operator",
                "only the caller's operator can transfer the call",
            ),
            LegStep::Nothing
            | LegStep::Answered
            | LegStep::Unusable
            | LegStep::Failed(_)
            | LegStep::NoAnswer
            | LegStep::Probe { .. }
            | LegStep::StillThere => {}
        }
    }

    // ---- transfers ----------------------------------------------------------------------

    /// Refuse a REFER (on leg `leg`, or the caller's own dialog) with `code`, counted by
    /// `reason`; `why` goes in a Warning.
    fn refuse_refer(
        &mut self,
        leg: Option<LegId>,
        txn: u64,
        code: u16,
        reason: &'static str,
        why: &str,
    ) {
        self.actions.push_back(Action::AnswerRequest {
            leg,
            txn,
            code,
            headers: vec![(
                "Warning".into(),
                format!(
                    "399 ivr311 \"{}\"",
                    crate::sip::message::sanitize_quoted(why)
                ),
            )],
        });
        self.actions.push_back(Action::CountRefusal(reason));
    }

    /// The operator's phone sent REFER on their leg (its transfer key): accept it (202) and
    /// start the transfer, or refuse it and let the call go on.
    fn on_operator_refer(&mut self, now: Instant, leg: LegId, agent: String, r: Refer) {
        let txn = r.txn;
        // 911 is never refused because another transfer is under way: that one gives way.
        let to_911 = r
            .refer_to
            .as_ref()
            .ok()
            .filter(|t| t.replaces.is_none())
            .and_then(|t| t.user())
            .is_some_and(|u| {
                self.config.dialplan.route(u, Some(&agent)) == Ok(Destination::Emergency)
            });
        if to_911 && !self.joining {
            self.supersede_transfer();
        }
        if self.transfer().is_some() || self.joining {
            info!("REFER while a transfer is in progress: 491");
            return self.refuse_refer(
                Some(leg),
                txn,
                491,
                "in_progress",
                "a transfer is in progress",
            );
        }
        let refer_to = match &r.refer_to {
            Ok(t) => t,
            Err(e) => {
                info!(error = %e, "REFER with an unusable Refer-To: 400");
                return self.refuse_refer(Some(leg), txn, 400, "bad_refer_to", &e.to_string());
            }
        };
        let connected = matches!(&self.phase, Phase::Queue(q) if q.connected.is_some());
        if !connected {
            return self.refuse_refer(
                Some(leg),
                txn,
                403,
                "not_bridged",
                "the call is not bridged",
            );
        }
        if let (Some(_), Some(dialog)) = (&refer_to.replaces, r.replaces_dialog) {
            // An attended transfer: `Replaces` names the operator's own call to the target
            // (a consultation from their phone), which is handed to this call.
            info!(%agent, "attended transfer: the consulted party joins the caller");
            self.actions.push_back(Action::AnswerRequest {
                leg: Some(leg),
                txn,
                code: 202,
                headers: Vec::new(),
            });
            self.refer_accepted(leg, r.cseq);
            self.joining = true;
            self.notify_operator(100);
            self.stop_playback();
            self.play(vec![ringback()]);
            self.actions
                .push_back(Action::JoinConsult { dialog, agent });
            return;
        }
        if refer_to.replaces.is_some() {
            info!("REFER with Replaces naming no call of ours: 481");
            return self.refuse_refer(
                Some(leg),
                txn,
                481,
                "no_such_dialog",
                "Replaces names no call of ours",
            );
        }
        let dialled = refer_to.user().unwrap_or("").to_owned();
        match self.config.dialplan.route(&dialled, Some(&agent)) {
            Err(no) => {
                info!(%dialled, reason = %no, "REFER to a target the dial plan refuses");
                self.refuse_refer(Some(leg), txn, no.code(), no.label(), &no.to_string());
            }
            Ok(dest) => {
                self.actions.push_back(Action::AnswerRequest {
                    leg: Some(leg),
                    txn,
                    code: 202,
                    headers: Vec::new(),
                });
                self.refer_accepted(leg, r.cseq);
                self.start_transfer(now, dest, Via::Refer);
            }
        }
    }

    /// A REFER on operator leg `leg` was accepted: from the second on that leg, its NOTIFYs
    /// carry its CSeq as the `Event` id (RFC 3515 §2.4.6).
    fn refer_accepted(&mut self, leg: LegId, cseq: u32) {
        let (on, n, _) = self.refers;
        let n = if on == Some(leg) { n } else { 0 };
        self.refers = (Some(leg), n + 1, (n > 0).then_some(cseq));
    }

    /// The consulted party of an attended transfer is handed over (or not).
    fn consult_joined(&mut self, result: Result<Box<(Transfer, Connected)>, (u16, String)>) {
        if !std::mem::take(&mut self.joining) {
            return;
        }
        match result {
            Ok(joined) => {
                let (t, c) = *joined;
                self.consulting = None;
                if matches!(c, Connected::Emergency(_)) {
                    self.outcome = Some("emergency");
                }
                self.notify_operator(200);
                if let Phase::Queue(q) = &mut self.phase {
                    q.transfer = Some(Box::new(t));
                }
                self.transfer_connected(c);
            }
            Err((code, why)) => {
                info!(code, reason = %why, "attended transfer failed; the caller stays with the operator");
                if code == 481 {
                    self.actions
                        .push_back(Action::CountRefusal("no_such_dialog"));
                }
                self.notify_operator(code);
                self.stop_playback();
                if self.leg_holds() {
                    self.play_names(&["hold_music"]);
                }
            }
        }
    }

    /// A transfer to 911 is asked for while another (not to 911) is under way: that one is
    /// called off (its target let go of, the phone told 487) and recorded so.
    fn supersede_transfer(&mut self) {
        match self.transfer_mut() {
            Some(t) if t.kind != "911" => t.supersede(),
            _ => return,
        }
        self.drain_transfer();
        let Phase::Queue(q) = &mut self.phase else {
            return;
        };
        if let Some(t) = q.transfer.take() {
            info!(transfer = t.id, target = %t.target, "transfer called off for 911");
            self.end_transfer(&t, None);
        }
    }

    /// `POST /admin/calls/{call_id}/transfer` (or the operator's console, `via`): the
    /// transfer's id, or why not (HTTP status).
    fn admin_transfer(
        &mut self,
        now: Instant,
        to: &str,
        via: Via,
    ) -> Result<TransferId, (u16, String)> {
        let by = self.queued().and_then(|q| q.connected.clone());
        if self.config.dialplan.route_admin(to, by.as_deref()) == Ok(Destination::Emergency) {
            self.supersede_transfer();
        }
        let agent = match &self.phase {
            Phase::Queue(q) if q.transfer.is_some() => {
                self.actions.push_back(Action::CountRefusal("in_progress"));
                return Err((409, "a transfer is in progress".into()));
            }
            Phase::Queue(q) if q.operator.as_ref().is_some_and(OperatorLeg::answered) => {
                q.connected.clone()
            }
            _ => {
                self.actions.push_back(Action::CountRefusal("not_bridged"));
                return Err((409, "the call is not with an operator".into()));
            }
        };
        match self.config.dialplan.route_admin(to, agent.as_deref()) {
            Err(no) => {
                self.actions.push_back(Action::CountRefusal(no.label()));
                Err((no.code(), no.to_string()))
            }
            Ok(dest) => Ok(self.start_transfer(now, dest, via)),
        }
    }

    /// The caller's operator dialled a queue's name from their phone (their caller on hold):
    /// the caller goes to the front of that queue with their wait kept, as a transfer asked
    /// [`Via::PhoneCall`]; the answer follows when it ends ([`Self::end_transfer`]).
    fn queue_by_phone(&mut self, now: Instant, agent: &str, queue: &str) {
        let with_them = matches!(&self.phase, Phase::Queue(q)
            if q.connected.as_deref() == Some(agent)
                && q.operator.as_ref().is_some_and(OperatorLeg::answered));
        if !with_them {
            info!(%agent, %queue, "an operator dialled a queue with no caller of theirs; 403");
            return self.refuse_queue_by_phone(
                403,
                "queue_by_phone",
                "you hold no caller to send to the queue",
            );
        }
        if self.transfer().is_some() || self.joining {
            info!(%agent, %queue, "an operator dialled a queue while a transfer goes on; 491");
            return self.refuse_queue_by_phone(491, "in_progress", "a transfer is in progress");
        }
        info!(%agent, %queue, "the operator sends the caller to the front of a queue");
        let id = self.start_transfer(now, Destination::Queue(queue.to_owned()), Via::PhoneCall);
        self.by_phone = Some(id);
    }

    fn refuse_queue_by_phone(&mut self, code: u16, reason: &'static str, why: &str) {
        self.actions.push_back(Action::CountRefusal(reason));
        self.actions
            .push_back(Action::QueueByPhoneAnswer(Err((code, why.to_owned()))));
    }

    /// What a transfer's target is told of the caller (while they are with an operator).
    fn transfer_context(&self, now: Instant) -> Option<transfer::Context> {
        let Phase::Queue(q) = &self.phase else {
            return None;
        };
        let by = q.connected.clone().unwrap_or_else(|| "admin".into());
        let language = self.engine.language().to_owned();
        let headers = vec![
            ("X-311-Language".to_owned(), language.clone()),
            ("X-311-Menu-Path".to_owned(), q.menu_path.clone()),
            ("X-311-Queue".to_owned(), q.name.clone()),
            (
                "X-311-Waited".to_owned(),
                now.saturating_duration_since(q.entered)
                    .as_secs()
                    .to_string(),
            ),
            ("X-311-Call-ID".to_owned(), self.meta.call_id.clone()),
            ("X-311-Transferred-By".to_owned(), by.clone()),
        ];
        Some(transfer::Context {
            call_id: self.meta.call_id.clone(),
            number: self.meta.caller.clone(),
            asserted: self.meta.identity.asserted().map(str::to_owned),
            line: self.config.callback.from_user.clone(),
            language,
            queue: q.name.clone(),
            headers,
            by,
            codec: self.media.neg.codec,
            local_ip: self.media.local.ip(),
        })
    }

    /// Start a transfer of the caller (with their operator) to `dest`.
    fn start_transfer(&mut self, now: Instant, dest: Destination, via: Via) -> TransferId {
        let id = transfer::new_id();
        let (label, kind) = (dest.label(), dest.kind());
        let Some(cx) = self.transfer_context(now) else {
            return id;
        };
        let Phase::Queue(q) = &self.phase else {
            return id;
        };
        let operator = q.connected.clone();
        if dest == Destination::Emergency {
            self.outcome = Some("emergency");
        }
        let menu_path = q.menu_path.clone();
        let start = transfer::start_for(
            id,
            dest,
            &cx,
            via,
            (&self.config.emergency, self.config.agent_ring, &menu_path),
            &mut self.legs,
        );
        let t = Transfer::start(now, id, (label, kind), via, operator, start);
        let rings = t.wants_ringback();
        self.stop_playback();
        if rings {
            self.play(vec![ringback()]);
        }
        let view = self.transfer_view(&t);
        self.actions.push_back(Action::RecordTransfer(view));
        if let Phase::Queue(q) = &mut self.phase {
            q.transfer = Some(Box::new(t));
        }
        self.drain_transfer();
        id
    }

    /// Carry out what the transfer asks.
    fn drain_transfer(&mut self) {
        loop {
            if self.ended || self.ending.is_some() {
                return;
            }
            let Some(out) = self.transfer_mut().and_then(Transfer::poll) else {
                return;
            };
            match out {
                transfer::Out::RingDirect {
                    agent,
                    ring_timeout,
                } => self
                    .actions
                    .push_back(Action::Queue(QueueCommand::RingDirect {
                        agent,
                        ring_timeout,
                    })),
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
                transfer::Out::Withdraw(agent) => self
                    .actions
                    .push_back(Action::Queue(QueueCommand::OfferWithdrawn(agent))),
                transfer::Out::Rejoin(queue) => self.rejoin(queue, true),
                transfer::Out::Emergency(o) => self.emergency_out(o),
                transfer::Out::Notify(code) => self.notify_operator(code),
                transfer::Out::Connected(c) => self.transfer_connected(c),
                transfer::Out::Failed { code, why } => self.transfer_failed(code, &why),
            }
        }
    }

    /// Report a transfer's progress to the operator's phone (NOTIFY on its leg), while the
    /// leg lasts.
    fn notify_operator(&mut self, code: u16) {
        let Some(leg) = self.operator().filter(|l| l.answered()).map(|l| l.id) else {
            return;
        };
        let req = self.next_req;
        self.next_req += 1;
        self.actions.push_back(Action::RequestLeg {
            leg,
            req,
            method: Method::Notify,
            headers: crate::sip::refer::notify_headers(
                code,
                transfer::SUBSCRIPTION_SECONDS,
                self.refers.2,
            ),
            body: Some((
                "message/sipfrag;version=2.0".to_owned(),
                crate::sip::refer::sipfrag(code),
            )),
        });
    }

    /// Ask the queue to take the caller back at the front of `queue` (for a transfer to it,
    /// or after a transfer failed with the operator gone).
    fn rejoin(&mut self, queue: String, for_transfer: bool) {
        let Phase::Queue(q) = &self.phase else { return };
        let (skill, since) = (q.skill.clone(), q.entered);
        self.pending_rejoin = Some((queue.clone(), for_transfer));
        self.actions.push_back(Action::Queue(QueueCommand::Rejoin {
            queue,
            skill,
            since,
        }));
    }

    /// The queue's answer to [`QueueCommand::Rejoin`].
    fn on_rejoined(&mut self, _now: Instant, result: Result<Position, Refusal>) {
        let Some((queue, for_transfer)) = self.pending_rejoin.take() else {
            return;
        };
        if for_transfer {
            self.rejoined_at = result.as_ref().ok().copied();
            if let Some(t) = self.transfer_mut() {
                t.queued(result.map(|_| ()).map_err(|r| r.to_string()));
            }
            self.drain_transfer();
            return;
        }
        match result {
            Ok(pos) => {
                info!(%queue, place = pos.place, "the caller is back at the front of the queue");
                self.stop_playback();
                let mut p = vec!["operator_queue".to_owned()];
                p.extend(position_prompts(self.engine.language(), pos));
                let names: Vec<&str> = p.iter().map(String::as_str).collect();
                self.play_names(&names);
            }
            Err(why) => {
                info!(%queue, reason = %why, "no operator can take the caller back; offering a ticket");
                self.phase = Phase::Menu;
                self.actions
                    .push_back(Action::Queue(QueueCommand::StopListening));
                self.stop_playback();
                self.inputs.push_back(engine::Input::QueueUnavailable);
            }
        }
    }

    /// The transfer reached its target: the operator is released and the call becomes what
    /// it reached.
    fn transfer_connected(&mut self, c: Connected) {
        let Phase::Queue(q) = &mut self.phase else {
            return;
        };
        let Some(t) = q.transfer.take() else { return };
        let old = q.operator.take();
        let old_agent = q.connected.take();
        if let Some(mut leg) = old {
            leg.drop_leg();
            self.actions.push_back(Action::DropLeg {
                leg: leg.id,
                how: LegEnd::HangUpAndRelease,
            });
        }
        if let Some(a) = old_agent {
            self.actions
                .push_back(Action::Queue(QueueCommand::CallEnded(a)));
        }
        self.stop_playback();
        let note = format!(
            "transferred to {} by {} ({})",
            t.target,
            t.operator.as_deref().unwrap_or("an admin"),
            t.via.as_str()
        );
        match c {
            Connected::Agent(leg) => {
                let agent = leg.agent.clone();
                info!(transfer = t.id, %agent, "the caller is with the new operator");
                self.actions
                    .push_back(Action::Queue(QueueCommand::DirectAnswered(agent.clone())));
                if let Phase::Queue(q) = &mut self.phase {
                    q.operator = Some(leg);
                    q.connected = Some(agent);
                }
            }
            Connected::Line { leg, name } => {
                info!(transfer = t.id, line = %name, "the caller is with the line");
                self.actions
                    .push_back(Action::Queue(QueueCommand::StopListening));
                self.phase = Phase::Line(Box::new(LineCall { leg, name }));
            }
            Connected::Emergency(e) => {
                info!(transfer = t.id, "the caller is with 911");
                self.actions
                    .push_back(Action::Queue(QueueCommand::StopListening));
                self.phase = Phase::Emergency(e);
            }
            Connected::Queue(name) => {
                info!(transfer = t.id, queue = %name, "the caller waits at the front of the queue");
                if let Phase::Queue(q) = &mut self.phase {
                    q.name = name;
                }
                if let Some(pos) = self.rejoined_at.take() {
                    let mut p = vec!["operator_queue".to_owned()];
                    p.extend(position_prompts(self.engine.language(), pos));
                    let names: Vec<&str> = p.iter().map(String::as_str).collect();
                    self.play_names(&names);
                }
            }
        }
        self.end_transfer(&t, Some(note));
    }

    /// The transfer failed: the caller goes back to the operator if they are still on the
    /// call, else to the front of the queue.
    fn transfer_failed(&mut self, code: u16, why: &str) {
        let Phase::Queue(q) = &mut self.phase else {
            return;
        };
        let Some(t) = q.transfer.take() else { return };
        let name = q.name.clone();
        self.stop_playback();
        let back = self.operator().is_some_and(OperatorLeg::answered);
        if back {
            info!(
                transfer = t.id,
                code,
                reason = why,
                "transfer failed; the caller goes back to the operator"
            );
            if self.leg_holds() {
                self.play_names(&["hold_music"]);
            }
        } else {
            info!(transfer = t.id, code, reason = why, "transfer failed and the operator has left; the caller goes back to the front of the queue");
            self.rejoin(name, false);
        }
        self.end_transfer(&t, None);
    }

    /// A transfer is over: its record, its count, and the admin view.
    fn end_transfer(&mut self, t: &Transfer, ticket_note: Option<String>) {
        let outcome = t.outcome.clone().unwrap_or_else(|| "done".into());
        let counted = if outcome == "connected" {
            "connected"
        } else if outcome == "caller hung up" {
            "caller_hung_up"
        } else if outcome == transfer::SUPERSEDED {
            "superseded"
        } else if self.operator().is_some() {
            "returned_to_operator"
        } else {
            "requeued"
        };
        let recorded = match counted {
            "returned_to_operator" => format!("{outcome}; back to the operator"),
            "requeued" => format!("{outcome}; back to the front of the queue"),
            _ => outcome,
        };
        self.actions.push_back(Action::CountTransfer {
            kind: t.kind,
            outcome: counted,
        });
        self.actions.push_back(Action::TransferOutcome {
            record: crate::dispatch::tickets::TransferRecord {
                id: t.id,
                call_id: self.meta.call_id.clone(),
                operator: t.operator.clone(),
                target: t.target.clone(),
                requested_via: t.via.as_str().to_owned(),
            },
            outcome: recorded.clone(),
            ticket_note,
        });
        if self.by_phone == Some(t.id) {
            self.by_phone = None;
            let answer = if counted == "connected" {
                Ok(())
            } else {
                Err((480, recorded.clone()))
            };
            self.actions.push_back(Action::QueueByPhoneAnswer(answer));
        }
        let mut view = self.transfer_view(t);
        view.state = recorded;
        view.done = true;
        self.shown_transfer = Some((t.id, view.state.clone()));
        self.actions.push_back(Action::ShowTransfer(view));
    }

    /// The operator's phone is gone (no audio, and no answer to OPTIONS, or 481): hang its
    /// leg up, free the operator, and give the caller what a caller with no operator gets (a
    /// ticket, or the menu again) rather than leave them in a silent bridge.
    fn operator_gone(&mut self) {
        self.forget_operator_leg(LegEnd::HangUpAndRelease);
        if let Phase::Queue(q) = std::mem::replace(&mut self.phase, Phase::Menu) {
            if let Some(agent) = q.connected {
                self.actions
                    .push_back(Action::Queue(QueueCommand::CallEnded(agent)));
            }
        }
        self.actions
            .push_back(Action::Queue(QueueCommand::StopListening));
        self.stop_playback();
        self.inputs.push_back(engine::Input::QueueUnavailable);
    }

    /// The offer to `agent` failed: the queue hears why, and the caller hears hold music
    /// again while the next operator is tried.
    fn queue_offer_failed(&mut self, agent: &str, why: OfferFailure) {
        self.actions
            .push_back(Action::Queue(QueueCommand::OfferFailed(
                agent.to_owned(),
                why,
            )));
        self.hold_music_if_quiet();
    }

    /// Hang up (or CANCEL) the operator leg, if any.
    fn drop_operator_leg(&mut self) {
        self.forget_operator_leg(LegEnd::HangUpAndRelease);
    }

    fn forget_operator_leg(&mut self, how: LegEnd) {
        if let Phase::Queue(q) = &mut self.phase {
            if let Some(mut leg) = q.operator.take() {
                leg.drop_leg();
                self.actions.push_back(Action::DropLeg { leg: leg.id, how });
            }
        }
    }

    /// Leave the queue (the caller's choice, the longest wait, or 911).
    fn leave_queue(&mut self) {
        let Phase::Queue(q) = &self.phase else {
            return;
        };
        if q.operator.as_ref().is_some_and(|l| !l.answered()) || q.connected.is_none() {
            self.drop_operator_leg();
        }
        self.phase = Phase::Menu;
        self.actions.push_back(Action::Queue(QueueCommand::Abandon));
    }

    // ---- call-backs -------------------------------------------------------------------

    /// The caller's number may be called back and the daily count was asked: keep their
    /// place for a call-back through the trunk, or (without a trunk, or when the place
    /// cannot be kept) file a ticket flagged for call-back.
    fn callback_claimed(&mut self, claimed: Option<bool>, number: CallbackNumber) {
        let waiting = self.queued().is_some_and(|q| q.connected.is_none());
        if !waiting {
            self.callback_filing = false;
            info!("the caller is no longer waiting; call-back request dropped");
            return;
        }
        match claimed {
            Some(true) => {}
            Some(false) => {
                self.callback_filing = false;
                self.callback_unavailable(Unavailable::DailyLimit);
                return;
            }
            None => {
                // The store said why in its own log line. Nothing was promised: the caller
                // hears the apology and keeps waiting (pressing 2 again tries again).
                self.callback_filing = false;
                self.stop_playback();
                self.play_names(&["db_error", "hold_music"]);
                return;
            }
        }
        if !self.config.callbacks {
            self.file_callback_ticket(&number.dial);
            return;
        }
        let Some(q) = self.queued() else { return };
        let req = CallbackRequest {
            caller: self.caller_id,
            number: number.dial.clone(),
            call_id: self.meta.call_id.clone(),
            language: self.engine.language().to_owned(),
            menu_path: q.menu_path.clone(),
            queue: q.name.clone(),
            entered: q.entered,
            local_ip: self.media.local.ip(),
        };
        if q.operator.is_some() {
            self.drop_operator_leg();
        }
        self.pending_callback = Some(number);
        self.actions.push_back(Action::KeepPlace(Box::new(req)));
    }

    fn callback_kept(&mut self, result: Result<(), NotKept>) {
        let Some(number) = self.pending_callback.take() else {
            return;
        };
        match result {
            Ok(()) => {
                self.callback_filing = false;
                // The place is the call-back's now: hang up without abandoning it.
                self.phase = Phase::Menu;
                self.actions
                    .push_back(Action::Queue(QueueCommand::StopListening));
                self.stop_playback();
                self.play_names(&["callback_kept"]);
                self.hangup_after_play = Some(EndReason::MenuHungUp);
            }
            Err(why @ (NotKept::NotDialable | NotKept::NotAllowed)) => {
                // Checked before asking, against the same settings; never filed for staff
                // either.
                self.callback_filing = false;
                warn!(reason = %why, "the call-back trunk refused a number the policy allowed");
                self.callback_unavailable(Unavailable::NotAllowed);
            }
            Err(why) => {
                info!(reason = %why, "place not kept; filing a ticket");
                self.file_callback_ticket(&number.dial);
            }
        }
    }

    /// The request becomes a ticket flagged for call-back with the caller's number, so an
    /// operator calls them. The caller keeps their place (and hold music) until the ticket is
    /// durable: only then are they told they will be called back.
    fn file_callback_ticket(&mut self, number: &str) {
        let t = super::callback::flagged_ticket(
            "Caller asked to be called back by an operator",
            number,
            self.engine.language(),
            &self.meta.call_id,
        );
        self.actions
            .push_back(Action::FileCallbackTicket(Box::new(t)));
    }

    /// The caller cannot be called back (`why`): they hear so, with the offer of a service
    /// request instead (1), and keep their place in the queue.
    fn callback_unavailable(&mut self, why: Unavailable) {
        info!(reason = %why, "no call-back for this line; a ticket is offered instead");
        self.stop_playback();
        self.play_names(&["callback_unavailable"]);
    }

    /// The call-back ticket of a waiting caller was written (or not). Saved: they leave the
    /// queue, hear that they will be called back, and are hung up. Not saved: they hear the
    /// apology and go on waiting for an operator (pressing 2 again tries again), so a request
    /// that was not stored is never confirmed.
    fn callback_filed(&mut self, ok: bool) {
        self.callback_filing = false;
        if self.queued().is_some_and(|q| q.connected.is_some()) {
            info!(
                saved = ok,
                "an operator answered while the call-back ticket was written"
            );
            return;
        }
        let mut prompts = vec![if ok { "callback_confirmed" } else { "db_error" }];
        if ok {
            self.leave_queue();
            self.hangup_after_play = Some(EndReason::MenuHungUp);
        } else if self.queued().is_some() {
            warn!("call-back ticket not saved; the caller keeps waiting");
            prompts.push("hold_music");
        }
        self.stop_playback();
        self.play_names(&prompts);
    }

    // ---- the end ----------------------------------------------------------------------

    /// End the call now for `reason`.
    fn finish(&mut self, now: Instant, reason: EndReason) {
        if self.ended || self.ending.is_some() {
            return;
        }
        self.ending = Some(reason);
        // No more RTP to the caller: a phone that hung up has closed its port, which may
        // already be another program's.
        self.actions.push_back(Action::EndMedia);
        if reason.files_what_was_given() && self.recording == Recording::On {
            self.actions
                .push_back(Action::CloseRecording { report: true });
            return; // `Input::RecordingClosed` completes the end
        }
        self.complete_end(now, reason, None);
    }

    fn complete_end(&mut self, _now: Instant, reason: EndReason, media_url: Option<String>) {
        // A call that ended mid-ticket (the caller hung up, or we did: shutdown, time limit):
        // file what we have (the ZIP was given), so no report is lost.
        if reason.files_what_was_given() {
            if let Some(t) = self.engine.abandon(media_url) {
                info!("caller left mid-ticket; filing what was given");
                self.file_ticket(t, false);
            }
        }
        match std::mem::replace(&mut self.phase, Phase::Menu) {
            Phase::Emergency(mut e) => {
                e.end_call(reason == EndReason::CallerHungUp);
                self.phase = Phase::Emergency(e);
                self.drain_emergency_at_end();
            }
            Phase::Queue(mut q) => {
                if let Some(mut t) = q.transfer.take() {
                    self.end_transfer_with_call(&mut t, &q, reason == EndReason::CallerHungUp);
                }
                let command = match q.connected.take() {
                    Some(agent) => QueueCommand::CallEnded(agent),
                    None => QueueCommand::Abandon,
                };
                self.actions.push_back(Action::Queue(command));
                if let Some(leg) = q.operator.take() {
                    self.actions.push_back(Action::DropLeg {
                        leg: leg.id,
                        how: LegEnd::HangUpAndRelease,
                    });
                }
            }
            Phase::Line(mut l) => {
                l.leg.drop_leg();
                self.actions.push_back(Action::DropLeg {
                    leg: l.leg.id,
                    how: LegEnd::HangUpAndRelease,
                });
            }
            Phase::Menu => {}
        }
        if !matches!(
            reason,
            EndReason::CallerHungUp | EndReason::Cancelled | EndReason::SignallingTimeout
        ) {
            self.actions.push_back(Action::HangUpCaller);
        }
        self.ending = None;
        self.ended = true;
        self.actions.push_back(Action::End(reason));
    }

    /// The call ends during a transfer: the target is let go of, the operator's phone told
    /// (before its leg is hung up), a 911 redirect ended as the menu's is, the record written.
    fn end_transfer_with_call(&mut self, t: &mut Transfer, q: &Queued, caller_hung_up: bool) {
        t.cancel();
        if let Some(e) = t.emergency_mut() {
            e.end_call(caller_hung_up);
            while let Some(out) = e.poll() {
                self.emergency_out_at_end(out);
            }
        }
        let op = q.operator.as_ref().filter(|l| l.answered()).map(|l| l.id);
        while let Some(out) = t.poll() {
            match out {
                transfer::Out::DropLeg { leg, .. } => self.actions.push_back(Action::DropLeg {
                    leg,
                    how: LegEnd::HangUpAndRelease,
                }),
                transfer::Out::Withdraw(agent) => self
                    .actions
                    .push_back(Action::Queue(QueueCommand::OfferWithdrawn(agent))),
                transfer::Out::Notify(code) => {
                    if let Some(leg) = op {
                        let req = self.next_req;
                        self.next_req += 1;
                        self.actions.push_back(Action::RequestLeg {
                            leg,
                            req,
                            method: Method::Notify,
                            headers: crate::sip::refer::notify_headers(code, 0, self.refers.2),
                            body: Some((
                                "message/sipfrag;version=2.0".to_owned(),
                                crate::sip::refer::sipfrag(code),
                            )),
                        });
                    }
                }
                transfer::Out::Emergency(o) => self.emergency_out_at_end(o),
                _ => {}
            }
        }
        if t.outcome.is_none() {
            t.outcome = Some("call ended".into());
        }
        self.end_transfer(t, None);
    }

    /// What a 911 redirect asks at the call's end: its outcome recorded and counted, its leg
    /// let go of (hung up and released).
    fn emergency_out_at_end(&mut self, out: emergency::Out) {
        match out {
            emergency::Out::AuditOutcome { id, outcome } => {
                self.actions.push_back(Action::AuditOutcome { id, outcome })
            }
            emergency::Out::Counted { method, outcome } => self
                .actions
                .push_back(Action::CountEmergency { method, outcome }),
            emergency::Out::DropLeg { leg, .. } => self.actions.push_back(Action::DropLeg {
                leg,
                how: LegEnd::HangUpAndRelease,
            }),
            _ => {}
        }
    }

    /// At the end, the 911 redirect records its outcome and lets its leg go (hung up and
    /// released); nothing else it asks for matters any more.
    fn drain_emergency_at_end(&mut self) {
        let Phase::Emergency(e) = &mut self.phase else {
            return;
        };
        let to_911 = e.line().is_none();
        while let Some(out) = e.poll() {
            match out {
                emergency::Out::AuditOutcome { id, outcome } => {
                    self.actions.push_back(Action::AuditOutcome { id, outcome })
                }
                emergency::Out::Counted { method, outcome } if to_911 => self
                    .actions
                    .push_back(Action::CountEmergency { method, outcome }),
                emergency::Out::DropLeg { leg, .. } => self.actions.push_back(Action::DropLeg {
                    leg,
                    how: LegEnd::HangUpAndRelease,
                }),
                _ => {}
            }
        }
    }
}

/// The 911 redirect going on in `phase`: the menu's, or a transfer's.
fn emergency_in(phase: &mut Phase) -> Option<&mut Emergency> {
    match phase {
        Phase::Emergency(e) => Some(e),
        Phase::Queue(q) => q.transfer.as_mut().and_then(|t| t.emergency_mut()),
        Phase::Menu | Phase::Line(_) => None,
    }
}

/// "You are caller number twelve. Your estimated wait is about four minutes." and the options,
/// in `lang` (quantities read as numbers, see [`crate::menu::say`]).
fn position_prompts(lang: &str, pos: Position) -> Vec<String> {
    use crate::menu::say::{number, Gender};
    let mut p = vec!["queue_position".to_owned()];
    p.extend(number(lang, pos.place as u64, Gender::Counting));
    let minutes = pos.ewt.as_secs().div_ceil(60).max(1);
    if minutes == 1 {
        p.push("queue_wait_one".into());
    } else {
        p.push("queue_wait".into());
        p.extend(number(lang, minutes, Gender::Masculine));
        p.push("minutes".into());
    }
    p.push("queue_options".into());
    p
}

/// The address a phone ticket gives the CRM and Open311 when the caller keyed a house number:
/// `"<house number>, ZIP <zip>"` (the street is in their recording).
fn phone_address(house_number: Option<&str>, zipcode: Option<&str>) -> Option<String> {
    match (house_number, zipcode) {
        (Some(h), Some(z)) => Some(format!("{h}, ZIP {z}")),
        (Some(h), None) => Some(h.to_owned()),
        (None, _) => None,
    }
}

#[cfg(test)]
mod tests {
    //! The call's logic on virtual time: the shipped menu, synthetic prompts, and a harness
    //! that answers what the driver would answer at once (a leg placed, the queue's answer).

    use super::*;
    use crate::call::leg::{Dial, LegSdp};
    use crate::call::CallerIdentity;
    use crate::dispatch::emergency::EmergencyMethod;
    use crate::media::g711::Codec;
    use crate::media::prompt::PromptStore;
    use crate::menu::validate::{self, PromptIndex};
    use std::path::Path;
    use std::sync::OnceLock;

    /// The shipped menu, with a short silent prompt for every prompt file.
    fn menu() -> Arc<ActiveMenu> {
        static MENU: OnceLock<Arc<ActiveMenu>> = OnceLock::new();
        MENU.get_or_init(|| {
            let dir = Path::new("prompts");
            let index = PromptIndex::from_dir(dir).unwrap();
            let loaded = validate::load(Path::new("menus/311.yaml"), &index).unwrap();
            let mut prompts = PromptStore::new();
            for lang in std::fs::read_dir(dir).unwrap().flatten() {
                if !lang.path().is_dir() {
                    continue;
                }
                let l = lang.file_name().to_string_lossy().into_owned();
                for f in std::fs::read_dir(lang.path()).unwrap().flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if let Some(stem) = name.strip_suffix(".wav") {
                        prompts.insert(&l, Prompt::from_pcm(stem, &[0; 160], 8000, 1).unwrap());
                    }
                }
            }
            Arc::new(ActiveMenu {
                file: Arc::new(loaded.file),
                main: loaded.main,
                path: loaded.path,
                prompts: Arc::new(prompts),
                schedules: loaded.schedules,
            })
        })
        .clone()
    }

    fn config() -> CoreConfig {
        let crisis = crate::call::dialplan::TransferLine {
            name: "crisis".into(),
            number: "988".into(),
            uri: "sip:988@198.51.100.30".into(),
            headers: [("X-Language".to_owned(), "{language}".to_owned())].into(),
            ring_timeout_seconds: 15,
            crisis: true,
        };
        CoreConfig {
            limits: Limits::default(),
            emergency: EmergencyConfig::default(),
            callback: Arc::new(CallbackConfig::default()),
            default_language: "en".into(),
            operators: true,
            callbacks: false,
            dialplan: DialPlan::new(
                &crate::call::dialplan::TransfersConfig(vec![crisis]),
                &["1001".into(), "1002".into()],
                &["general".into(), "permits".into()],
            ),
            agent_ring: Duration::from_secs(20),
            recorded_queues: Arc::new(Vec::new()),
            queue_announcements: Arc::new(Vec::new()),
        }
    }

    /// A US geographic number (call-backs may dial it).
    const CALLER: &str = "+12122000123";

    /// A call under test. Actions the driver answers at once are answered here too: a leg is
    /// placed, the queue takes the caller, a call-back keeps the place, a recording closes.
    struct Call {
        core: CallCore,
        t0: Instant,
        now: Instant,
        /// What `Enqueue` gets.
        enqueued: Result<Position, Refusal>,
        /// What `KeepPlace` gets.
        kept: Result<(), NotKept>,
        /// What `RingDirect` gets.
        direct: Result<(), &'static str>,
        /// What `Rejoin` gets.
        rejoined: Result<Position, Refusal>,
    }

    impl Call {
        fn start(config: CoreConfig, identity: CallerIdentity) -> (Call, Vec<Action>) {
            let t0 = Instant::now();
            let meta = CallMeta {
                call_id: "call-1@test".into(),
                caller: identity.number().to_owned(),
                identity,
                dialled: "311".into(),
                line: "default".into(),
                // A Monday at 10:00 in New York: the shipped menu's call centre is open.
                answered_at: "2026-12-07T15:00:00Z".parse().unwrap(),
            };
            let media = CallerMedia {
                local: "192.0.2.1:20000".parse().unwrap(),
                session_id: 42,
                neg: sdp::Negotiated {
                    codec: Codec::Pcmu,
                    payload_type: 0,
                    telephone_event: Some(101),
                    direction: sdp::Direction::SendRecv,
                },
            };
            let core = CallCore::new(t0, Arc::new(config), menu(), meta, 9, media);
            let mut c = Call {
                core,
                t0,
                now: t0,
                enqueued: Ok(Position {
                    place: 1,
                    ewt: Duration::from_secs(60),
                }),
                kept: Ok(()),
                direct: Ok(()),
                rejoined: Ok(Position {
                    place: 1,
                    ewt: Duration::from_secs(30),
                }),
            };
            c.core.start(t0);
            let out = c.drive();
            (c, out)
        }

        fn verified() -> (Call, Vec<Action>) {
            Call::start(config(), CallerIdentity::Asserted(CALLER.into()))
        }

        /// The core's actions, with the driver's immediate answers fed back.
        fn drive(&mut self) -> Vec<Action> {
            let mut all = Vec::new();
            while let Some(a) = self.core.poll_action() {
                let answer = match &a {
                    Action::PlaceLeg(p) => Some(Input::Placed(
                        p.leg,
                        Ok(Placed {
                            sdp: LegSdp::new("192.0.2.1:30000".parse().unwrap()),
                            toward: Some("198.51.100.9".parse().unwrap()),
                            looked_up: None,
                        }),
                    )),
                    Action::Queue(QueueCommand::Enqueue { .. }) => {
                        Some(Input::Enqueued(self.enqueued))
                    }
                    Action::KeepPlace(_) => Some(Input::CallbackKept(self.kept)),
                    Action::Queue(QueueCommand::RingDirect { .. }) => {
                        Some(Input::RangDirect(self.direct))
                    }
                    Action::Queue(QueueCommand::Rejoin { .. }) => {
                        Some(Input::Rejoined(self.rejoined))
                    }
                    Action::CloseRecording { report: true } => Some(Input::RecordingClosed {
                        media_url: Some("rec.wav".into()),
                    }),
                    _ => None,
                };
                all.push(a);
                if let Some(i) = answer {
                    self.core.handle(self.now, i);
                }
            }
            all
        }

        fn input(&mut self, i: Input) -> Vec<Action> {
            self.core.handle(self.now, i);
            self.drive()
        }

        /// Move the clock to `secs` after the answer.
        fn at(&mut self, secs: f64) -> Vec<Action> {
            self.now = self.t0 + Duration::from_secs_f64(secs);
            self.core.handle_timeout(self.now);
            self.drive()
        }

        fn keys(&mut self, keys: &str) -> Vec<Action> {
            keys.chars()
                .flat_map(|k| self.input(Input::Digit(k)))
                .collect()
        }

        fn played(&mut self) -> Vec<Action> {
            self.input(Input::PlayDone)
        }

        fn leg(&mut self, leg: LegId, ev: LegEvent) -> Vec<Action> {
            self.input(Input::Leg(leg, Some(ev)))
        }

        fn queue(&mut self, ev: QueueEvent) -> Vec<Action> {
            self.input(Input::Queue(ev))
        }

        fn dialog(&mut self, ev: DialogEvent) -> Vec<Action> {
            self.input(Input::Dialog(ev))
        }

        /// English, not an emergency, 0: waiting for an operator (what the 0 did).
        fn queued(&mut self) -> Vec<Action> {
            self.keys("11");
            self.keys("0")
        }

        /// Queued, offered to 1001, who answers: the leg.
        fn with_operator(&mut self) -> LegId {
            self.queued();
            let out = self.offer("1001");
            let leg = placed(&out).unwrap().0;
            self.leg(leg, answer());
            leg
        }

        fn offer(&mut self, agent: &str) -> Vec<Action> {
            self.queue(QueueEvent::Offer {
                agent: agent.into(),
                ring_timeout: Duration::from_secs(20),
            })
        }
    }

    /// The names of the prompts played.
    fn prompts(out: &[Action]) -> Vec<String> {
        out.iter()
            .filter_map(|a| match a {
                Action::Play(p) => Some(p.iter().map(|p| p.name.clone())),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn placed(out: &[Action]) -> Option<(LegId, &PlaceLeg)> {
        out.iter().find_map(|a| match a {
            Action::PlaceLeg(p) => Some((p.leg, &**p)),
            _ => None,
        })
    }

    fn queue_cmds(out: &[Action]) -> Vec<QueueCommand> {
        out.iter()
            .filter_map(|a| match a {
                Action::Queue(q) => Some(q.clone()),
                _ => None,
            })
            .collect()
    }

    fn ended(out: &[Action]) -> Option<EndReason> {
        out.iter().find_map(|a| match a {
            Action::End(r) => Some(*r),
            _ => None,
        })
    }

    fn dropped(out: &[Action], leg: LegId) -> Option<LegEnd> {
        out.iter().find_map(|a| match a {
            Action::DropLeg { leg: l, how } if *l == leg => Some(*how),
            _ => None,
        })
    }

    fn bridge(out: &[Action]) -> Option<Option<BridgeTo>> {
        out.iter().rev().find_map(|a| match a {
            Action::SetBridge(b) => Some(*b),
            _ => None,
        })
    }

    fn shown(out: &[Action]) -> Option<String> {
        out.iter().rev().find_map(|a| match a {
            Action::Show { state, .. } => Some(state.clone()),
            _ => None,
        })
    }

    fn hangs_up_caller(out: &[Action]) -> bool {
        out.iter().any(|a| matches!(a, Action::HangUpCaller))
    }

    fn answer() -> LegEvent {
        LegEvent::Answered {
            sdp: Bytes::from_static(b"v=0\r\no=op 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"),
        }
    }

    #[test]
    fn a_looked_up_request_plays_the_speech_rendered_for_it_and_skips_what_was_not() {
        let (mut c, _) = Call::verified();
        c.keys("11");
        c.keys("6");
        let out = c.keys("12345678");
        assert!(out.iter().any(|a| matches!(
            a,
            Action::LookupTicket { id: 12345678, language } if language == "en"
        )));
        let notes = Arc::new(Prompt::from_samples("spoken-notes", &[3000; 1600], 8000).unwrap());
        c.input(Input::Spoken(vec![("@notes".into(), notes)]));
        // The date was not rendered (speech failed or timed out): it is left out.
        let out = c.input(Input::Engine(engine::Input::Status(
            engine::StatusResult::Found {
                open: true,
                days_since_update: 0,
                filed: true,
                notes: true,
            },
        )));
        assert_eq!(
            prompts(&out),
            ["ticket_status_open", "updated_today", "spoken-notes"]
        );
    }

    #[test]
    fn the_menu_starts_and_the_registry_shows_where_the_caller_is() {
        let (mut c, out) = Call::verified();
        assert!(!prompts(&out).is_empty(), "the language menu plays");
        assert!(shown(&out).is_some());
        let out = c.keys("1");
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Show { language, .. } if language == "en")));
    }

    #[test]
    fn the_queue_announcement_plays_in_full_before_the_caller_is_enqueued_and_9_is_still_911() {
        let announced = || {
            let mut cfg = config();
            cfg.queue_announcements = Arc::new(vec![("general".into(), "call_recorded".into())]);
            Call::start(cfg, CallerIdentity::Asserted(CALLER.into())).0
        };
        let mut c = announced();
        let out = c.queued();
        assert_eq!(prompts(&out), ["call_recorded"]);
        assert!(
            queue_cmds(&out).is_empty(),
            "not offered before the announcement"
        );
        // Keys do not skip it (1 would leave a queue for a ticket).
        let out = c.keys("1#");
        assert!(queue_cmds(&out).is_empty() && prompts(&out).is_empty());
        let out = c.played();
        assert!(matches!(
            queue_cmds(&out).as_slice(),
            [QueueCommand::Enqueue { queue, .. }] if queue == "general"
        ));
        assert!(prompts(&out).contains(&"operator_queue".to_owned()));

        let mut c = announced();
        c.queued();
        let out = c.keys("9");
        assert!(matches!(c.core.phase, Phase::Emergency(_)), "9 is 911");
        assert!(queue_cmds(&out).is_empty());
        let out = c.played();
        assert!(queue_cmds(&out).is_empty(), "never enqueued after 911");
    }

    #[test]
    fn a_caller_is_offered_to_an_operator_with_context_and_bridged_when_they_answer() {
        let (mut c, _) = Call::verified();
        let out = c.queued();
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::Enqueue {
                queue: "general".into(),
                skill: Some("en".into()),
                context: CallerContext {
                    number: c.core.meta.caller.clone(),
                    call_id: c.core.meta.call_id.clone(),
                    language: "en".into(),
                    menu_path: "language:1 > screening:1 > main:0".into(),
                    ..CallerContext::default()
                },
            }]
        );
        let heard = prompts(&out);
        assert!(heard.contains(&"operator_queue".to_owned()), "{heard:?}");
        assert!(heard.contains(&"queue_position".to_owned()), "{heard:?}");
        assert_eq!(shown(&out).as_deref(), Some("waiting for operator"));
        c.now = c.t0 + Duration::from_secs(42);
        let out = c.offer("1001");
        let (leg, p) = placed(&out).expect("the operator's phone is rung");
        assert_eq!(p.to, Dial::Agent("1001".into()));
        assert_eq!(p.from_user, CALLER);
        assert_eq!(p.asserted.as_deref(), Some(CALLER));
        let header = |n: &str| {
            (p.headers.iter())
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header("X-311-Waited").as_deref(), Some("42"));
        assert_eq!(header("X-311-Queue").as_deref(), Some("general"));
        assert_eq!(
            header("X-311-Menu-Path").as_deref(),
            Some("language:1 > screening:1 > main:0")
        );
        let out = c.leg(leg, answer());
        assert!(out.iter().any(|a| matches!(a, Action::StopPlayback)));
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::OfferAnswered("1001".into())]
        );
        let b = bridge(&out).flatten().expect("bridged");
        assert!(b.answered && b.operator && b.leg == leg);
        assert_eq!(
            b.scope,
            crate::media::rtp::LatchScope::SdpOr("198.51.100.9".parse().unwrap())
        );
        assert_eq!(shown(&out).as_deref(), Some("with operator"));
        // Keys go to the operator through the bridge, not to the menu.
        assert!(prompts(&c.keys("1")).is_empty());
        // The caller hangs up: the operator's leg is hung up and the agent freed.
        let out = c.dialog(DialogEvent::Bye);
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::CallEnded("1001".into())]
        );
        assert_eq!(dropped(&out, leg), Some(LegEnd::HangUpAndRelease));
        assert_eq!(ended(&out), Some(EndReason::CallerHungUp));
        assert!(!hangs_up_caller(&out));
    }

    #[test]
    fn an_operator_who_does_not_answer_in_time_is_cancelled_and_the_next_is_rung() {
        let (mut c, _) = Call::verified();
        c.queued();
        let out = c.offer("1001");
        let (first, _) = placed(&out).unwrap();
        c.leg(
            first,
            LegEvent::Provisional {
                code: 180,
                sdp: None,
            },
        );
        assert!(c.at(19.9).is_empty());
        let out = c.at(20.0);
        assert_eq!(dropped(&out, first), Some(LegEnd::HangUpAndRelease));
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::OfferFailed(
                "1001".into(),
                OfferFailure::NoAnswer
            )]
        );
        // The queue rings the next one.
        let out = c.offer("1002");
        let (second, p) = placed(&out).unwrap();
        assert_ne!(first, second);
        assert_eq!(p.to, Dial::Agent("1002".into()));
        assert_eq!(p.from_user, CALLER, "the caller's number");
        // Events of the first leg are not the second's.
        assert!(c.leg(first, answer()).is_empty());
    }

    #[test]
    fn a_busy_phone_or_one_with_no_common_codec_is_reported_and_hold_music_goes_on() {
        let (mut c, _) = Call::verified();
        c.queued();
        // The queue's prompts have played: the caller hears hold music between them.
        assert_eq!(prompts(&c.played()), vec!["hold_music"]);
        let leg = placed(&c.offer("1001")).unwrap().0;
        let out = c.leg(
            leg,
            LegEvent::Failed {
                code: 486,
                reason: "Busy Here".into(),
            },
        );
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::OfferFailed("1001".into(), OfferFailure::Busy)]
        );
        assert_eq!(dropped(&out, leg), Some(LegEnd::Forget));
        let leg = placed(&c.offer("1002")).unwrap().0;
        let out = c.leg(
            leg,
            LegEvent::Answered {
                sdp: Bytes::from_static(
                    b"v=0\r\nc=IN IP4 198.51.100.9\r\nm=audio 4000 RTP/AVP 18\r\n",
                ),
            },
        );
        assert_eq!(dropped(&out, leg), Some(LegEnd::HangUpAndRelease));
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::OfferFailed(
                "1002".into(),
                OfferFailure::NoCommonCodec
            )]
        );
    }

    #[test]
    fn the_caller_hanging_up_while_an_operator_rings_cancels_the_offer() {
        let (mut c, _) = Call::verified();
        c.queued();
        let leg = placed(&c.offer("1001")).unwrap().0;
        let out = c.dialog(DialogEvent::Bye);
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert_eq!(dropped(&out, leg), Some(LegEnd::HangUpAndRelease));
        assert_eq!(ended(&out), Some(EndReason::CallerHungUp));
    }

    #[test]
    fn the_queue_withdrawing_an_offer_cancels_that_phone_only() {
        let (mut c, _) = Call::verified();
        c.queued();
        let leg = placed(&c.offer("1001")).unwrap().0;
        assert!(c
            .queue(QueueEvent::CancelOffer {
                agent: "1002".into()
            })
            .is_empty());
        let out = c.queue(QueueEvent::CancelOffer {
            agent: "1001".into(),
        });
        assert_eq!(dropped(&out, leg), Some(LegEnd::HangUpAndRelease));
        assert!(queue_cmds(&out).is_empty());
    }

    #[test]
    fn one_operator_rings_at_a_time_and_a_ring_all_rounds_other_offers_are_withdrawn() {
        let (mut c, _) = Call::verified();
        c.queued();
        assert!(placed(&c.offer("1001")).is_some());
        let out = c.offer("1002");
        assert!(placed(&out).is_none());
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::OfferWithdrawn("1002".into())]
        );
    }

    #[test]
    fn with_no_operator_to_take_the_call_the_caller_is_told_at_once() {
        let (mut c, _) = Call::verified();
        c.enqueued = Err(Refusal::NoAgents);
        let out = c.queued();
        assert_eq!(
            prompts(&out),
            vec!["operator_unavailable", "offer_general_ticket"]
        );
        // Without queues configured at all, the same.
        let cfg = CoreConfig {
            operators: false,
            ..config()
        };
        let (mut c, _) = Call::start(cfg, CallerIdentity::Claimed(CALLER.into()));
        let out = c.queued();
        assert!(queue_cmds(&out).is_empty());
        assert_eq!(
            prompts(&out),
            vec!["operator_unavailable", "offer_general_ticket"]
        );
    }

    #[test]
    fn a_silent_operator_phone_is_asked_then_hung_up_and_the_caller_offered_a_ticket() {
        let (mut c, _) = Call::verified();
        let leg = c.with_operator();
        c.now = c.t0 + Duration::from_secs(100);
        let out = c.input(Input::LegSilent);
        assert!(
            out.iter().any(|a| matches!(a, Action::RequestLeg { leg: l, method: Method::Options, .. } if *l == leg)),
            "{out:?}"
        );
        assert!(c.at(103.9).is_empty());
        let out = c.at(104.0);
        assert_eq!(dropped(&out, leg), Some(LegEnd::HangUpAndRelease));
        assert_eq!(
            queue_cmds(&out),
            vec![
                QueueCommand::CallEnded("1001".into()),
                QueueCommand::StopListening
            ]
        );
        assert_eq!(bridge(&out), Some(None), "the bridge ends");
        assert_eq!(
            prompts(&out),
            vec!["operator_unavailable", "offer_general_ticket"]
        );
    }

    #[test]
    fn a_silent_operator_phone_that_answers_the_probe_keeps_the_bridge() {
        let (mut c, _) = Call::verified();
        let leg = c.with_operator();
        let out = c.input(Input::LegSilent);
        let req = out
            .iter()
            .find_map(|a| match a {
                Action::RequestLeg { req, .. } => Some(*req),
                _ => None,
            })
            .unwrap();
        let out = c.leg(
            leg,
            LegEvent::Dialog(DialogEvent::RequestOutcome {
                req,
                method: Method::Options,
                code: 200,
            }),
        );
        assert!(
            out.iter().any(|a| matches!(a, Action::RearmLegWatch)),
            "{out:?}"
        );
        assert!(c.at(10.0).is_empty());
    }

    #[test]
    fn an_operator_holding_the_caller_plays_hold_music_until_they_resume() {
        let (mut c, _) = Call::verified();
        let leg = c.with_operator();
        let offer = |dir: &str| {
            LegEvent::Dialog(DialogEvent::Reoffer {
                txn: 1,
                method: Method::Invite,
                content_type: Some("application/sdp".into()),
                body: format!("v=0\r\no=op 1 2 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na={dir}\r\n").into(),
            })
        };
        let out = c.leg(leg, offer("sendonly"));
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::ReplyLeg { code: 200, .. })));
        assert_eq!(prompts(&out), vec!["hold_music"]);
        // Looped while held.
        assert_eq!(prompts(&c.played()), vec!["hold_music"]);
        let out = c.leg(leg, offer("sendrecv"));
        assert!(out.iter().any(|a| matches!(a, Action::StopPlayback)));
        assert!(prompts(&out).is_empty());
        assert!(bridge(&out)
            .flatten()
            .is_some_and(|b| b.media.0.direction == sdp::Direction::SendRecv));
    }

    // ---- transfers ----------------------------------------------------------------------

    fn refer(txn: u64, to: &str) -> LegEvent {
        LegEvent::Dialog(DialogEvent::Refer(Box::new(Refer {
            txn,
            cseq: 2,
            refer_to: crate::sip::refer::refer_to([to].into_iter()),
            referred_by: Some("sip:1001@198.51.100.9".into()),
            replaces_dialog: None,
        })))
    }

    fn answered_request(
        out: &[Action],
        leg: Option<LegId>,
    ) -> Option<(u16, Vec<(String, String)>)> {
        out.iter().find_map(|a| match a {
            Action::AnswerRequest {
                leg: l,
                code,
                headers,
                ..
            } if *l == leg => Some((*code, headers.clone())),
            _ => None,
        })
    }

    /// The NOTIFYs sent on `leg`: their sipfrag status and Subscription-State.
    fn notifies(out: &[Action], leg: LegId) -> Vec<(u16, String)> {
        out.iter()
            .filter_map(|a| match a {
                Action::RequestLeg {
                    leg: l,
                    method: Method::Notify,
                    headers,
                    body: Some((ct, body)),
                    ..
                } if *l == leg => {
                    assert!(ct.starts_with("message/sipfrag"), "{ct}");
                    assert!(headers.contains(&("Event".to_owned(), "refer".to_owned())));
                    let state = headers
                        .iter()
                        .find(|(k, _)| k == "Subscription-State")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    Some((crate::sip::refer::sipfrag_code(body).unwrap_or(0), state))
                }
                _ => None,
            })
            .collect()
    }

    fn refusals(out: &[Action]) -> Vec<&'static str> {
        out.iter()
            .filter_map(|a| match a {
                Action::CountRefusal(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    fn target_answer() -> LegEvent {
        LegEvent::Answered {
            sdp: Bytes::from_static(b"v=0\r\no=t 1 1 IN IP4 198.51.100.30\r\ns=-\r\nc=IN IP4 198.51.100.30\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"),
        }
    }

    #[test]
    fn an_operators_refer_to_a_line_rings_it_for_the_caller_and_releases_the_operator() {
        let (mut c, _) = Call::verified();
        let op = c.with_operator();
        c.now = c.t0 + Duration::from_secs(60);
        let out = c.leg(op, refer(11, "<sip:988@192.0.2.1>"));
        assert_eq!(answered_request(&out, Some(op)).map(|a| a.0), Some(202));
        assert_eq!(
            notifies(&out, op),
            vec![(100, "active;expires=60".to_owned())],
            "100 Trying on the implicit subscription"
        );
        let (target, p) = placed(&out).expect("the line is called");
        assert!(matches!(&p.to, Dial::Uri { uri, .. } if uri == "sip:988@198.51.100.30"));
        assert_eq!(p.from_user, CALLER, "the caller's number");
        assert_eq!(
            p.asserted.as_deref(),
            Some(CALLER),
            "asserted: a trusted trunk did"
        );
        let header = |n: &str| {
            p.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header("X-311-Transferred-By").as_deref(), Some("1001"));
        assert_eq!(header("X-311-Call-ID").as_deref(), Some("call-1@test"));
        assert_eq!(header("X-Language").as_deref(), Some("en"));
        // The caller leaves the operator's bridge and hears ringback.
        assert_eq!(bridge(&out), Some(None));
        assert_eq!(prompts(&out), vec!["ringback"]);
        assert_eq!(shown(&out).as_deref(), Some("transferring"));
        assert!(out.iter().any(
            |a| matches!(a, Action::RecordTransfer(v) if v.target == "crisis" && v.via == "refer")
        ));
        // Ringback loops while it rings; keys go nowhere.
        c.leg(
            target,
            LegEvent::Provisional {
                code: 180,
                sdp: None,
            },
        );
        assert_eq!(prompts(&c.played()), vec!["ringback"]);
        assert!(
            c.keys("9").is_empty(),
            "not even 9: the caller is being connected"
        );
        let out = c.leg(target, target_answer());
        assert_eq!(
            notifies(&out, op),
            vec![(200, "terminated;reason=noresource".to_owned())]
        );
        assert_eq!(
            dropped(&out, op),
            Some(LegEnd::HangUpAndRelease),
            "the operator is released"
        );
        assert_eq!(
            queue_cmds(&out),
            vec![
                QueueCommand::CallEnded("1001".into()),
                QueueCommand::StopListening
            ]
        );
        let b = bridge(&out).flatten().expect("bridged to the line");
        assert!(b.leg == target && b.answered && !b.operator);
        assert_eq!(shown(&out).as_deref(), Some("transferred"));
        assert!(out.iter().any(|a| matches!(
            a,
            Action::TransferOutcome { outcome, ticket_note: Some(note), .. }
                if outcome == "connected" && note == "transferred to crisis by 1001 (refer)"
        )));
        assert!(out.iter().any(|a| matches!(
            a,
            Action::CountTransfer {
                kind: "line",
                outcome: "connected"
            }
        )));
        // The line hangs up: so does the caller's call.
        let out = c.leg(target, LegEvent::Dialog(DialogEvent::Bye));
        assert_eq!(ended(&out), Some(EndReason::TargetHungUp));
        assert!(hangs_up_caller(&out));
    }

    #[test]
    fn a_failed_transfer_returns_the_caller_to_the_operator_who_is_told_why() {
        let (mut c, _) = Call::verified();
        let op = c.with_operator();
        let out = c.leg(op, refer(11, "<sip:crisis@192.0.2.1>"));
        let (target, _) = placed(&out).unwrap();
        let out = c.leg(
            target,
            LegEvent::Failed {
                code: 486,
                reason: "Busy Here".into(),
            },
        );
        assert_eq!(
            notifies(&out, op),
            vec![(486, "terminated;reason=noresource".to_owned())]
        );
        let b = bridge(&out).flatten().expect("back with the operator");
        assert!(b.leg == op && b.operator);
        assert!(queue_cmds(&out).is_empty(), "the operator keeps the call");
        assert_eq!(shown(&out).as_deref(), Some("with operator"));
        assert!(out.iter().any(|a| matches!(
            a,
            Action::TransferOutcome { outcome, ticket_note: None, .. }
                if outcome == "failed: answered 486 Busy Here; back to the operator"
        )));
        // Another transfer may follow.
        let out = c.leg(op, refer(12, "<sip:988@192.0.2.1>"));
        assert_eq!(answered_request(&out, Some(op)).map(|a| a.0), Some(202));
    }

    #[test]
    fn the_operator_hanging_up_mid_transfer_then_a_failure_puts_the_caller_first_in_line() {
        let (mut c, _) = Call::verified();
        c.now = c.t0 + Duration::from_secs(10);
        c.queued();
        c.now = c.t0 + Duration::from_secs(40);
        let offer = c.offer("1001");
        let op = placed(&offer).unwrap().0;
        c.leg(op, answer());
        let out = c.leg(op, refer(11, "<sip:988@192.0.2.1>"));
        let (target, _) = placed(&out).unwrap();
        c.leg(
            target,
            LegEvent::Provisional {
                code: 180,
                sdp: None,
            },
        );
        // The phone hangs up after the 202, as many do for a blind transfer.
        let out = c.leg(op, LegEvent::Dialog(DialogEvent::Bye));
        assert!(ended(&out).is_none(), "the transfer goes on");
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::CallEnded("1001".into())]
        );
        // Nobody answers at the line.
        let out = c.at(40.0 + 15.0);
        assert_eq!(dropped(&out, target), Some(LegEnd::HangUpAndRelease));
        let since = c.t0 + Duration::from_secs(10);
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::Rejoin {
                queue: "general".into(),
                skill: Some("en".into()),
                since
            }],
            "the front of the line, the wait kept"
        );
        assert!(notifies(&out, op).is_empty(), "the phone is gone");
        assert!(
            prompts(&out).starts_with(&["operator_queue".to_owned()]),
            "{:?}",
            prompts(&out)
        );
        assert_eq!(shown(&out).as_deref(), Some("waiting for operator"));
        assert!(ended(&out).is_none());
        // The next operator is rung with the original wait.
        c.now = c.t0 + Duration::from_secs(70);
        let out = c.offer("1002");
        let (_, p) = placed(&out).unwrap();
        let waited = p.headers.iter().find(|(k, _)| k == "X-311-Waited").unwrap();
        assert_eq!(waited.1, "60");
    }

    #[test]
    fn the_caller_hanging_up_mid_transfer_cancels_the_target_and_tells_the_phone() {
        let (mut c, _) = Call::verified();
        let op = c.with_operator();
        let out = c.leg(op, refer(11, "<sip:988@192.0.2.1>"));
        let (target, _) = placed(&out).unwrap();
        let out = c.dialog(DialogEvent::Bye);
        assert_eq!(dropped(&out, target), Some(LegEnd::HangUpAndRelease));
        let notify = out
            .iter()
            .position(|a| {
                matches!(
                    a,
                    Action::RequestLeg {
                        method: Method::Notify,
                        ..
                    }
                )
            })
            .expect("the phone hears 487");
        let drop_op = out
            .iter()
            .position(|a| matches!(a, Action::DropLeg { leg, .. } if *leg == op))
            .unwrap();
        assert!(notify < drop_op, "before its leg is hung up");
        assert_eq!(notifies(&out, op)[0].0, 487);
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::CallEnded("1001".into())]
        );
        assert_eq!(ended(&out), Some(EndReason::CallerHungUp));
    }

    #[test]
    fn refers_that_cannot_be_taken_are_refused_counted_and_the_call_goes_on() {
        let (mut c, _) = Call::verified();
        let op = c.with_operator();
        // From the caller's side.
        let out = c.dialog(DialogEvent::Refer(Box::new(Refer {
            txn: 1,
            cseq: 2,
            refer_to: crate::sip::refer::refer_to(["<sip:988@x>"].into_iter()),
            referred_by: None,
            replaces_dialog: None,
        })));
        assert_eq!(answered_request(&out, None).map(|a| a.0), Some(403));
        assert_eq!(refusals(&out), vec!["not_operator"]);
        for (to, code, reason) in [
            ("<sip:+12125550199@192.0.2.1>", 403, "forbidden_number"),
            ("<sip:bob@192.0.2.1>", 404, "not_found"),
            ("<sip:1001@192.0.2.1>", 403, "themselves"),
            ("<http://x>", 400, "bad_refer_to"),
            (
                "<sip:1002@x?Replaces=a%3Bto-tag%3D1%3Bfrom-tag%3D2>",
                481,
                "no_such_dialog",
            ),
        ] {
            let out = c.leg(op, refer(2, to));
            let (got, headers) = answered_request(&out, Some(op)).unwrap();
            assert_eq!(got, code, "{to}");
            assert!(headers.iter().any(|(k, _)| k == "Warning"), "{to}");
            assert_eq!(refusals(&out), vec![reason], "{to}");
            assert!(ended(&out).is_none() && placed(&out).is_none());
        }
        // One at a time.
        c.leg(op, refer(3, "<sip:988@x>"));
        let out = c.leg(op, refer(4, "<sip:988@x>"));
        assert_eq!(answered_request(&out, Some(op)).map(|a| a.0), Some(491));
        assert_eq!(refusals(&out), vec!["in_progress"]);
    }

    fn bridge_911() -> CoreConfig {
        CoreConfig {
            emergency: EmergencyConfig {
                method: Some(EmergencyMethod::Bridge),
                uri: Some("sip:911@198.51.100.20".into()),
                ..EmergencyConfig::default()
            },
            ..config()
        }
    }

    #[test]
    fn a_refer_to_911_takes_the_emergency_routes_and_the_caller_stays_with_the_operator_if_all_fail(
    ) {
        let (mut c, _) = Call::start(bridge_911(), CallerIdentity::Asserted(CALLER.into()));
        let op = c.with_operator();
        let out = c.leg(op, refer(11, "<sip:911@anything.example>"));
        assert_eq!(
            answered_request(&out, Some(op)).map(|a| a.0),
            Some(202),
            "never refused"
        );
        assert_eq!(prompts(&out), vec!["connecting_911"]);
        let Some(Action::AuditStart(a)) = out.iter().find(|a| matches!(a, Action::AuditStart(_)))
        else {
            panic!("{out:?}")
        };
        assert_eq!(a.operator.as_deref(), Some("1001"));
        assert_eq!(a.requested_via.as_deref(), Some("refer"));
        assert_eq!(a.caller.as_deref(), Some(CALLER));
        let out = c.input(Input::Audited(Some(4)));
        let (leg, p) = placed(&out).expect("the route is called");
        assert_eq!(
            (p.from_user.as_str(), p.asserted.as_deref()),
            (CALLER, Some(CALLER))
        );
        c.played();
        let out = c.leg(
            leg,
            LegEvent::Failed {
                code: 503,
                reason: "Service Unavailable".into(),
            },
        );
        assert_eq!(notifies(&out, op)[0].0, 503);
        assert!(!prompts(&out).contains(&"emergency_announce".to_owned()));
        assert!(out.iter().any(|a| matches!(a, Action::AuditOutcome { id: 4, outcome } if outcome.starts_with("returned to operator"))));
        let b = bridge(&out).flatten().expect("back with the operator");
        assert_eq!(b.leg, op);
        assert!(ended(&out).is_none());
        // 911 answering instead: the operator is released and the call is 911's.
        let (mut c, _) = Call::start(bridge_911(), CallerIdentity::Asserted(CALLER.into()));
        let op = c.with_operator();
        c.leg(op, refer(11, "<tel:911>"));
        let (leg, _) = placed(&c.input(Input::Audited(Some(4)))).unwrap();
        let out = c.leg(leg, answer());
        assert_eq!(notifies(&out, op)[0].0, 200);
        assert_eq!(dropped(&out, op), Some(LegEnd::HangUpAndRelease));
        assert_eq!(shown(&out).as_deref(), Some("emergency"));
        assert!(bridge(&out)
            .flatten()
            .is_some_and(|b| b.leg == leg && b.answered));
    }

    #[test]
    fn an_admin_transfer_to_another_agent_rings_them_and_makes_them_the_operator() {
        let (mut c, _) = Call::verified();
        // Not with an operator yet: refused.
        let out = c.input(Input::AdminTransfer {
            to: "agent:1002".into(),
            via: Via::Admin,
        });
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::AdminTransferAnswer(Err((409, _))))));
        let op = c.with_operator();
        let out = c.input(Input::AdminTransfer {
            to: "agent:1002".into(),
            via: Via::Admin,
        });
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::AdminTransferAnswer(Ok(_)))));
        assert!(queue_cmds(&out).contains(&QueueCommand::RingDirect {
            agent: "1002".into(),
            ring_timeout: Duration::from_secs(20)
        }));
        let (leg, p) = placed(&out).expect("1002's phone rings");
        assert_eq!(p.to, Dial::Agent("1002".into()));
        assert!(notifies(&out, op).is_empty(), "not asked by the phone");
        let out = c.leg(leg, answer());
        assert_eq!(dropped(&out, op), Some(LegEnd::HangUpAndRelease));
        assert_eq!(
            queue_cmds(&out),
            vec![
                QueueCommand::CallEnded("1001".into()),
                QueueCommand::DirectAnswered("1002".into())
            ]
        );
        let b = bridge(&out).flatten().unwrap();
        assert!(b.leg == leg && b.operator);
        assert_eq!(shown(&out).as_deref(), Some("with operator"));
        // 1002 can transfer in turn; a busy agent fails at once.
        c.direct = Err("on_call");
        let out = c.leg(leg, refer(5, "<sip:1001@x>"));
        assert_eq!(answered_request(&out, Some(leg)).map(|a| a.0), Some(202));
        assert!(placed(&out).is_none());
        assert_eq!(notifies(&out, leg).last().map(|n| n.0), Some(486));
        // Unknown targets: the API's answer.
        let out = c.input(Input::AdminTransfer {
            to: "555".into(),
            via: Via::Admin,
        });
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::AdminTransferAnswer(Err((403, _))))));
    }

    #[test]
    fn a_refer_to_a_queue_puts_the_caller_at_its_front_and_frees_the_operator() {
        let (mut c, _) = Call::verified();
        let op = c.with_operator();
        let out = c.leg(op, refer(11, "<sip:permits@192.0.2.1>"));
        assert!(
            matches!(
                queue_cmds(&out).as_slice(),
                [QueueCommand::Rejoin { queue, .. }, QueueCommand::CallEnded(a)] if queue == "permits" && a == "1001"
            ),
            "{:?}",
            queue_cmds(&out)
        );
        assert_eq!(notifies(&out, op).last().map(|n| n.0), Some(200));
        assert_eq!(dropped(&out, op), Some(LegEnd::HangUpAndRelease));
        assert_eq!(shown(&out).as_deref(), Some("waiting for operator"));
        assert!(prompts(&out).contains(&"operator_queue".to_owned()));
        // Refused by the queue: back to the operator.
        let (mut c, _) = Call::verified();
        c.rejoined = Err(Refusal::NoAgents);
        let op = c.with_operator();
        let out = c.leg(op, refer(11, "<sip:permits@192.0.2.1>"));
        assert_eq!(notifies(&out, op).last().map(|n| n.0), Some(480));
        assert!(bridge(&out).flatten().is_some_and(|b| b.leg == op));
    }

    #[test]
    fn an_operator_dialling_a_queue_sends_their_caller_to_its_front_and_is_answered_then() {
        let (mut c, _) = Call::verified();
        // No operator with the caller: refused, nothing moves.
        let out = c.input(Input::QueueByPhone {
            agent: "1001".into(),
            queue: "permits".into(),
        });
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::QueueByPhoneAnswer(Err((403, _))))));
        assert!(queue_cmds(&out).is_empty());
        let op = c.with_operator();
        // Another operator's phone cannot move this caller.
        let out = c.input(Input::QueueByPhone {
            agent: "1002".into(),
            queue: "permits".into(),
        });
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::QueueByPhoneAnswer(Err((403, _))))));
        let out = c.input(Input::QueueByPhone {
            agent: "1001".into(),
            queue: "permits".into(),
        });
        assert!(
            matches!(
                queue_cmds(&out).as_slice(),
                [QueueCommand::Rejoin { queue, .. }, QueueCommand::CallEnded(a)] if queue == "permits" && a == "1001"
            ),
            "{:?}",
            queue_cmds(&out)
        );
        assert_eq!(dropped(&out, op), Some(LegEnd::HangUpAndRelease));
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::QueueByPhoneAnswer(Ok(())))),
            "answered once the queue took the caller"
        );
        assert!(notifies(&out, op).is_empty(), "no REFER to report on");
        assert_eq!(shown(&out).as_deref(), Some("waiting for operator"));
        // The queue refusing the caller: the phone hears why, the caller stays.
        let (mut c, _) = Call::verified();
        c.rejoined = Err(Refusal::NoAgents);
        let op = c.with_operator();
        let out = c.input(Input::QueueByPhone {
            agent: "1001".into(),
            queue: "permits".into(),
        });
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::QueueByPhoneAnswer(Err((480, _))))));
        assert!(bridge(&out).flatten().is_some_and(|b| b.leg == op));
    }

    #[test]
    fn the_operator_hanging_up_ends_the_call() {
        let (mut c, _) = Call::verified();
        let leg = c.with_operator();
        let out = c.leg(leg, LegEvent::Dialog(DialogEvent::Bye));
        assert_eq!(ended(&out), Some(EndReason::AgentHungUp));
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::CallEnded("1001".into())]
        );
        assert!(hangs_up_caller(&out));
    }

    #[test]
    fn keys_while_waiting_leave_for_a_ticket_or_go_to_911() {
        let (mut c, _) = Call::verified();
        c.queued();
        let leg = placed(&c.offer("1001")).unwrap().0;
        let out = c.keys("1");
        assert_eq!(dropped(&out, leg), Some(LegEnd::HangUpAndRelease));
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert_eq!(
            prompts(&out),
            vec!["operator_unavailable", "offer_general_ticket"]
        );

        let (mut c, _) = Call::verified();
        c.queued();
        let out = c.keys("9");
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert_eq!(prompts(&out), vec!["connecting_911"]);
        let Some(Action::AuditStart(a)) = out.iter().find(|a| matches!(a, Action::AuditStart(_)))
        else {
            panic!("{out:?}")
        };
        assert_eq!(a.menu_path, "language:1 > screening:1 > main:0 > queue:9");
        assert_eq!(shown(&out).as_deref(), Some("emergency"));
    }

    #[test]
    fn an_unverified_caller_asking_for_a_call_back_hears_it_is_not_available_and_keeps_waiting() {
        let (mut c, _) = Call::start(config(), CallerIdentity::Claimed(CALLER.into()));
        c.queued();
        let out = c.keys("2");
        assert_eq!(prompts(&out), vec!["callback_unavailable"]);
        assert!(queue_cmds(&out).is_empty());
        assert!(!out.iter().any(|a| matches!(a, Action::ClaimCallback(_))));
    }

    #[test]
    fn a_call_back_keeps_the_place_and_the_call_ends_after_saying_so() {
        let cfg = CoreConfig {
            callbacks: true,
            ..config()
        };
        let (mut c, _) = Call::start(cfg, CallerIdentity::Asserted(CALLER.into()));
        c.queued();
        let leg = placed(&c.offer("1001")).unwrap().0;
        let out = c.keys("2");
        let Some(Action::ClaimCallback(number)) =
            out.iter().find(|a| matches!(a, Action::ClaimCallback(_)))
        else {
            panic!("{out:?}")
        };
        let number = number.clone();
        assert_eq!(number.e164, CALLER);
        // Pressed again while the first is taken: nothing more.
        assert!(c
            .keys("2")
            .iter()
            .all(|a| !matches!(a, Action::ClaimCallback(_))));
        let out = c.input(Input::CallbackClaimed(Some(true), number));
        assert_eq!(
            dropped(&out, leg),
            Some(LegEnd::HangUpAndRelease),
            "the ringing phone is let go"
        );
        let Some(Action::KeepPlace(req)) = out.iter().find(|a| matches!(a, Action::KeepPlace(_)))
        else {
            panic!("{out:?}")
        };
        assert_eq!(
            (req.caller, req.number.as_str(), req.queue.as_str()),
            (9, CALLER, "general")
        );
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::StopListening],
            "the place is not abandoned"
        );
        assert_eq!(prompts(&out), vec!["callback_kept"]);
        let out = c.played();
        assert_eq!(ended(&out), Some(EndReason::MenuHungUp));
        assert!(queue_cmds(&out).is_empty());
    }

    #[test]
    fn a_call_back_past_its_daily_limit_or_without_a_trunk() {
        let (mut c, _) = Call::verified();
        c.queued();
        let number = CallbackNumber {
            dial: CALLER.into(),
            e164: CALLER.into(),
        };
        c.keys("2");
        let out = c.input(Input::CallbackClaimed(Some(false), number.clone()));
        assert_eq!(prompts(&out), vec!["callback_unavailable"]);
        // Without a trunk, a flagged ticket; the caller is told only once it is saved.
        c.keys("2");
        let out = c.input(Input::CallbackClaimed(Some(true), number.clone()));
        let Some(Action::FileCallbackTicket(t)) = out
            .iter()
            .find(|a| matches!(a, Action::FileCallbackTicket(_)))
        else {
            panic!("{out:?}")
        };
        assert!(t.callback_requested);
        assert_eq!(t.phone.as_deref(), Some(CALLER));
        assert!(prompts(&out).is_empty());
        let out = c.input(Input::CallbackFiled(false));
        assert_eq!(prompts(&out), vec!["db_error", "hold_music"]);
        assert!(queue_cmds(&out).is_empty(), "still waiting");
        c.keys("2");
        c.input(Input::CallbackClaimed(Some(true), number));
        let out = c.input(Input::CallbackFiled(true));
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert_eq!(prompts(&out), vec!["callback_confirmed"]);
        assert_eq!(ended(&c.played()), Some(EndReason::MenuHungUp));
    }

    #[test]
    fn the_queue_giving_up_offers_a_ticket() {
        let (mut c, _) = Call::verified();
        c.queued();
        let out = c.queue(QueueEvent::MaxWait);
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert_eq!(
            prompts(&out),
            vec!["operator_unavailable", "offer_general_ticket"]
        );
    }

    #[test]
    fn a_call_reaching_its_maximum_length_is_hung_up() {
        let (mut c, _) = Call::verified();
        let max = Limits::default().max_call_seconds as f64;
        assert!(ended(&c.at(max - 1.0)).is_none());
        let out = c.at(max);
        assert_eq!(ended(&out), Some(EndReason::MaxDuration));
        assert!(hangs_up_caller(&out));
        assert!(out.iter().any(|a| matches!(a, Action::EndMedia)));
    }

    #[test]
    fn at_the_end_of_the_drain_a_caller_in_the_menu_hears_goodbye_but_one_with_an_operator_is_not_talked_over(
    ) {
        let (mut c, _) = Call::verified();
        let out = c.input(Input::Closing);
        assert_eq!(prompts(&out), vec!["shutdown_goodbye"]);
        // Keys no longer count.
        assert!(prompts(&c.keys("1")).is_empty());
        let out = c.played();
        assert_eq!(ended(&out), Some(EndReason::Shutdown));
        assert!(hangs_up_caller(&out));

        let (mut c, _) = Call::verified();
        c.with_operator();
        assert!(c.input(Input::Closing).is_empty());
        let out = c.input(Input::Shutdown);
        assert_eq!(ended(&out), Some(EndReason::Shutdown));
    }

    #[test]
    fn a_caller_leaving_mid_recording_still_has_the_ticket_filed() {
        let (mut c, _) = Call::verified();
        // English, not an emergency, streets, pothole, the ZIP and its pound.
        c.keys("1111");
        c.keys("10458#");
        let mut started = false;
        for _ in 0..20 {
            let out = c.played();
            if out
                .iter()
                .any(|a| matches!(a, Action::StartRecording { .. }))
            {
                started = true;
                break;
            }
        }
        assert!(started, "the recording starts");
        assert_eq!(shown(&c.drive()).as_deref(), None);
        let out = c.dialog(DialogEvent::Bye);
        let i = out
            .iter()
            .position(|a| matches!(a, Action::CloseRecording { report: true }));
        let j = out
            .iter()
            .position(|a| matches!(a, Action::FileTicket { report: false, .. }));
        assert!(i.is_some() && j.is_some() && i < j, "{out:?}");
        let Some(Action::FileTicket { ticket, .. }) = j.map(|j| &out[j]) else {
            unreachable!()
        };
        assert_eq!(ticket.zipcode.as_deref(), Some("10458"));
        assert_eq!(ticket.recording.as_deref(), Some("rec.wav"));
        assert_eq!(ticket.phone.as_deref(), Some(CALLER));
        assert_eq!(ended(&out), Some(EndReason::CallerHungUp));
    }

    #[test]
    fn the_emergency_key_refers_the_caller_after_the_notice_and_the_audit() {
        let cfg = CoreConfig {
            emergency: EmergencyConfig {
                method: Some(EmergencyMethod::Refer),
                uri: Some("sip:911@psap.example.gov".into()),
                ..EmergencyConfig::default()
            },
            ..config()
        };
        let (mut c, _) = Call::start(cfg, CallerIdentity::Asserted(CALLER.into()));
        c.keys("1");
        let out = c.keys("9");
        assert_eq!(prompts(&out), vec!["connecting_911"]);
        assert!(out.iter().any(|a| matches!(a, Action::AuditStart(_))));
        // Keys do not interrupt a 911 redirect.
        assert!(c.keys("0").is_empty());
        assert!(c.input(Input::Audited(Some(5))).is_empty());
        let out = c.played();
        let Some(Action::RequestCaller {
            method: Method::Refer,
            headers,
            ..
        }) = out.first()
        else {
            panic!("{out:?}")
        };
        assert!(headers.contains(&("Refer-To".into(), "<sip:911@psap.example.gov>".into())));
        c.dialog(DialogEvent::RequestOutcome {
            req: 1,
            method: Method::Refer,
            code: 202,
        });
        let out = c.dialog(DialogEvent::Notify {
            event: "refer".into(),
            body: Bytes::from_static(b"SIP/2.0 200 OK\r\n"),
        });
        assert!(out.iter().any(
            |a| matches!(a, Action::AuditOutcome { id: 5, outcome } if outcome == "connected via refer")
        ));
        assert_eq!(ended(&out), Some(EndReason::Emergency));
        assert!(hangs_up_caller(&out));
    }

    #[test]
    fn a_refused_refer_and_a_failed_bridge_end_in_the_announcement_then_a_hang_up() {
        let cfg = CoreConfig {
            emergency: EmergencyConfig {
                method: Some(EmergencyMethod::Refer),
                uri: Some("sip:911@127.0.0.1:5999".into()),
                ..EmergencyConfig::default()
            },
            ..config()
        };
        let (mut c, _) = Call::start(cfg, CallerIdentity::Asserted(CALLER.into()));
        c.keys("19");
        c.input(Input::Audited(Some(5)));
        let out = c.played();
        assert!(out.iter().any(|a| matches!(
            a,
            Action::RequestCaller {
                method: Method::Refer,
                ..
            }
        )));
        // A trunk that cannot act on REFER: the bridge next, with ringback.
        let out = c.dialog(DialogEvent::RequestOutcome {
            req: 1,
            method: Method::Refer,
            code: 501,
        });
        let (leg, _) = placed(&out).expect("the bridge is tried");
        assert_eq!(prompts(&out), vec!["ringback"]);
        // Nothing answers at the route within the first-response time.
        let out = c.at(5.0);
        assert_eq!(dropped(&out, leg), Some(LegEnd::HangUp));
        assert_eq!(prompts(&out), vec!["emergency_announce"]);
        assert!(ended(&c.played()).is_none(), "announced twice");
        let out = c.played();
        let outcome = out.iter().find_map(|a| match a {
            Action::AuditOutcome { id: 5, outcome } => Some(outcome.as_str()),
            _ => None,
        });
        assert_eq!(
            outcome,
            Some("announced via announce after refer: REFER answered 501; bridge to sip:911@127.0.0.1:5999: no answer in time")
        );
        assert_eq!(ended(&out), Some(EndReason::Emergency));
        assert!(hangs_up_caller(&out), "the caller is hung up (BYE)");
    }

    #[test]
    fn the_emergency_bridge_is_placed_at_the_key_and_the_caller_bridged_when_911_answers() {
        let cfg = CoreConfig {
            emergency: EmergencyConfig {
                method: Some(EmergencyMethod::Bridge),
                uri: Some("sip:911@198.51.100.20".into()),
                ..EmergencyConfig::default()
            },
            ..config()
        };
        let (mut c, _) = Call::start(cfg, CallerIdentity::Asserted(CALLER.into()));
        c.keys("19");
        let out = c.input(Input::Audited(Some(5)));
        let (leg, p) = placed(&out).expect("the INVITE leaves at once");
        assert!(matches!(&p.to, Dial::Uri { uri, .. } if uri == "sip:911@198.51.100.20"));
        // A closing server does not talk over a 911 call.
        assert!(c.input(Input::Closing).is_empty());
        let out = c.leg(leg, answer());
        let b = bridge(&out).flatten().expect("bridged");
        assert!(b.answered && !b.operator);
        let out = c.leg(leg, LegEvent::Dialog(DialogEvent::Bye));
        assert_eq!(ended(&out), Some(EndReason::Emergency));
    }

    #[test]
    fn a_caller_holding_the_call_is_answered_and_a_reinvite_without_sdp_gets_our_offer() {
        let (mut c, _) = Call::verified();
        let out = c.dialog(DialogEvent::Reoffer {
            txn: 4,
            method: Method::Invite,
            content_type: Some("application/sdp".into()),
            body: Bytes::from_static(b"v=0\r\no=c 1 2 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\na=sendonly\r\n"),
        });
        let Some(Action::ReplyCaller {
            txn: 4,
            code: 200,
            body: Some((_, sdp)),
        }) = out.iter().find(|a| matches!(a, Action::ReplyCaller { .. }))
        else {
            panic!("{out:?}")
        };
        assert!(String::from_utf8_lossy(sdp).contains("a=recvonly"));
        assert!(out.iter().any(|a| matches!(a, Action::Renegotiate((n, addr)) if n.direction == sdp::Direction::RecvOnly && addr.port() == 5000)));
        let out = c.dialog(DialogEvent::Reoffer {
            txn: 5,
            method: Method::Invite,
            content_type: None,
            body: Bytes::new(),
        });
        assert!(out.iter().any(|a| matches!(
            a,
            Action::ReplyCaller {
                txn: 5,
                code: 200,
                body: Some(_)
            }
        )));
        // The ACK answers our offer: the media moves.
        let out = c.dialog(DialogEvent::Confirmed {
            sdp: Bytes::from_static(b"v=0\r\no=c 1 3 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\nm=audio 5002 RTP/AVP 0\r\n"),
        });
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Renegotiate((_, addr)) if addr.port() == 5002)));
        // An offer we cannot take: 488, and the call goes on.
        let out = c.dialog(DialogEvent::Reoffer {
            txn: 6,
            method: Method::Invite,
            content_type: Some("application/sdp".into()),
            body: Bytes::from_static(b"v=0\r\nc=IN IP4 203.0.113.5\r\nm=audio 5000 RTP/AVP 18\r\n"),
        });
        assert!(out.iter().any(|a| matches!(
            a,
            Action::ReplyCaller {
                txn: 6,
                code: 488,
                ..
            }
        )));
        assert!(ended(&out).is_none());
    }
}
