//! Call-backs that keep the caller's place: a small sans-IO core ([`CallbackCore`]) and its
//! driver.
//!
//! A caller waiting for an operator presses 2 and hangs up; with `callback.trunk_uri`
//! configured their queue entry stays where it was (see "Call-backs" in
//! [`crate::dispatch::queue`] for the sans-IO rules: when the caller is dialled, retries, the
//! agent held back meanwhile). The call hands the entry to [`Callbacks::keep_place`], which
//! starts one task per call-back, owned by the server's tracker. Its core:
//!
//! 1. waits for [`CallbackEvent::DialBack`], then INVITEs `sip:<number>@<trunk>` with From
//!    `<from_user>` (the 311 number) and reports the outcome to the queue (ring timeout:
//!    CANCEL and report a failure; the queue retries or gives up); a trunk named with several
//!    addresses is dialled at the next one on each attempt;
//! 2. on answer plays `callback_hello` ("This is 311 calling you back; please hold for an
//!    operator") in the caller's language, then, for a queue with a `record_announcement`,
//!    that prompt in full (the caller answering a call-back has not heard it on this call):
//!    an offer the queue makes meanwhile is held back and rung once it has played, for what
//!    is left of the queue's ring time (given back at no cost when under [`MIN_RING`]); then
//!    hold music;
//! 3. rings each agent the queue offers through an [`OperatorLeg`], the type live callers use:
//!    the same `X-311-*` headers as a live caller's offer plus `X-311-Callback: yes`, From and
//!    P-Asserted-Identity the caller's number, one phone at a time (with `ring_all`, the
//!    round's other offers are withdrawn at no cost); the same hold, re-offer and silent-phone
//!    handling;
//! 4. on the agent's 200 bridges the two outbound legs; either side's BYE hangs up the other.
//!    A queue with `record: true` records the bridge as a live call's
//!    ([`crate::media::call_record`]: stereo, caller left, operator right) in the recording
//!    of the call that asked for the call-back (named after its Call-ID, appended to if that
//!    call was recorded already), finished when either side hangs up or the server stops.
//!
//! The answered caller's leg is a slot on the [`MediaClock`], like a live caller's: the
//! clock's shards pace its prompts and hold music, watch it for silence
//! ([`MediaNote::NoMedia`]) and, once an operator answers, relay the bridge themselves
//! ([`SlotState::set_bridge`](crate::media::clock::SlotState::set_bridge)), so the task does
//! not wake per packet. Its prompts are those of the menu in service when the call-back was
//! asked for (a reload does not change them, as for a live call).
//!
//! Nobody is lost: when every dial failed ([`CallbackEvent::Unreached`]), when the answered
//! caller can be taken by no logged-in operator (`MaxWait`: they hear `callback_confirmed`
//! once the ticket is saved), and when the server stops (or the queue goes away) before an
//! operator took the call, the call-back files a ticket flagged for call-back with the
//! caller's number. So pending call-backs do not survive a restart as queue entries, but each
//! becomes a flagged ticket at shutdown (`ivr311 serve` allows 5 s for tasks to finish after
//! the drain). A caller who answers and hangs up before an operator takes the call counts as
//! abandoned, like a live caller who hangs up (there is no answering-machine detection: a
//! voicemail that answers is treated as the caller).
//!
//! Who is called back at all is decided before any of this, when the caller presses 2
//! ([`CallbackConfig::callback_number`]): only a number a trusted trunk asserted (see
//! [`crate::call::CallerIdentity`]), inside `callback.allowed_numbers`
//! ([`crate::dispatch::numbers::NumberPattern`]) and outside `callback.refused_numbers`, and
//! within `callback.per_number_per_day` (counted by the ticket store). A call-back costs the
//! city a call to whatever number it dials, so a number a caller merely typed into From is
//! never one; [`Callbacks::keep_place`] checks the patterns again where the dialling is.
//!
//! Bounds: at most `callback.max_pending` call-backs at once (more requests become flagged
//! tickets at once), one trunk leg and one agent leg per task, `limits.no_media_seconds`
//! without RTP from the answered caller and `limits.max_call_seconds` end the call.
//!
//! This module owns no queue logic and no SIP parsing: it talks to the queue through
//! [`QueueHandle`] and places legs through the call driver's [`place_leg`], and must not reach
//! into a live call's state (a live call only calls [`Callbacks::keep_place`]). Call-back legs
//! do not show in `/admin/calls` and the shutdown drain does not wait for a bridged call-back
//! (it is hung up when the server stops); their entries show in `/admin/queues` (`waiting`,
//! `callbacks_pending`).

use super::driver::{bridge_for, now, place_leg, LegDeps, Legs};
use super::emergency::LegIds;
use super::leg::{leg_answer, BridgeTo, Dial, LegEnd, LegId, Media, NotPlaced, PlaceLeg, Placed};
use super::menu_holder::MenuHolder;
use super::operator_leg::{LegStep, MediaChange, OperatorLeg, OperatorOffer};
use crate::config::{CallbackConfig, Limits, LogConfig};
use crate::dispatch::numbers::{dialable, e164, without_separators, CallbackNumber, Unavailable};
use crate::dispatch::queue::{CallbackEvent, CallerId, OfferFailure, QueueEvent, QueueHandle};
use crate::dispatch::tickets::{Channel, NewTicket, TicketStore};
use crate::media::clock::{MediaClock, MediaHandle, MediaNote};
use crate::media::g711::Codec;
use crate::media::ports::PortPool;
use crate::media::prompt::{Prompt, PromptStore};
use crate::media::rtp::LatchScope;
use crate::media::session::MediaSession;
use crate::sip::message::Method;
use crate::sip::transport::Flow;
use crate::sip::ua::{DialogEvent, LegEvent, OutboundHandle};
use bytes::Bytes;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

/// Events buffered per call-back (the queue drops, never blocks, when full).
const EVENTS: usize = 16;

/// The shortest ring an operator gets for an offer held back by the recording announcement.
const MIN_RING: Duration = Duration::from_secs(5);

/// Why a call-back request could not keep the caller's place (the call files a flagged
/// ticket instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotKept {
    /// The caller's number is not one a trunk can dial (anonymous, a name...).
    #[error("the caller's number cannot be dialled")]
    NotDialable,
    /// The caller's number is not one `callback.allowed_numbers` lets call-backs dial.
    #[error("the caller's number is not one call-backs may dial")]
    NotAllowed,
    /// `callback.max_pending` call-backs are pending already.
    #[error("too many call-backs pending")]
    TooMany,
    /// The caller was no longer waiting (answered, gone) or the queue has stopped.
    #[error("the caller is not waiting in a queue")]
    NotWaiting,
}

/// What the call knows that the call-back needs.
#[derive(Debug, Clone)]
pub struct CallbackRequest {
    /// The caller's queue entry.
    pub caller: CallerId,
    /// The number to call back (the call's caller id).
    pub number: String,
    /// The original call's Call-ID (for `X-311-Call-ID` and the ticket).
    pub call_id: String,
    pub language: String,
    pub menu_path: String,
    pub queue: String,
    /// When the caller entered the queue (`X-311-Waited` counts from here).
    pub entered: Instant,
    /// Our media address family/interface as the caller's call used it.
    pub local_ip: IpAddr,
}

/// How the caller's queue records its talks with operators, as a live call of that queue
/// would (`record`, `record_announcement`).
#[derive(Debug, Clone, Default)]
pub struct CallbackRecording {
    /// The recordings directory, when the queue records (`record: true`): the talk is written
    /// to the recording of the call that asked for the call-back.
    pub dir: Option<PathBuf>,
    /// The prompt the answered caller hears in full, after `callback_hello`, before any
    /// operator is rung.
    pub announcement: Option<String>,
}

impl CallbackConfig {
    /// Whether call-backs may dial `e164`: one of `allowed_numbers` and none of
    /// `refused_numbers`.
    pub fn allows(&self, e164: &str) -> bool {
        self.allowed_numbers.iter().any(|p| p.matches(e164))
            && !self.refused_numbers.iter().any(|p| p.matches(e164))
    }

    /// The number to call `caller` back at, if they may be called back at all (the daily
    /// count is the store's: [`crate::dispatch::tickets::TicketStore::claim_callback`]).
    pub fn callback_number(
        &self,
        caller: &crate::call::CallerIdentity,
    ) -> Result<CallbackNumber, Unavailable> {
        let asserted = caller.asserted().ok_or(Unavailable::Unverified)?;
        let dial = without_separators(asserted);
        let e164 = e164(&dial).ok_or(Unavailable::NotDialable)?;
        if !dialable(&dial) {
            return Err(Unavailable::NotDialable);
        }
        if !self.allows(&e164) {
            return Err(Unavailable::NotAllowed);
        }
        if self.per_number_per_day == 0 {
            return Err(Unavailable::DailyLimit);
        }
        Ok(CallbackNumber { dial, e164 })
    }
}

/// Starts call-backs; cheap to clone. Built by the server when `callback.trunk_uri` and
/// agents are configured.
#[derive(Clone)]
pub struct Callbacks {
    inner: Arc<Inner>,
}

struct Inner {
    config: CallbackConfig,
    queues: QueueHandle,
    outbound: OutboundHandle,
    ports: Arc<PortPool>,
    clock: Arc<MediaClock>,
    agent_contacts: Arc<DashMap<String, (String, Flow)>>,
    menu: Arc<MenuHolder>,
    default_language: String,
    tickets: TicketStore,
    limits: Limits,
    log: LogConfig,
    tracker: TaskTracker,
    cancel: CancellationToken,
    pending: AtomicUsize,
    history: crate::history::History,
}

/// Everything [`Callbacks`] uses that the server owns.
pub struct CallbackDeps {
    /// Where each call-back's attempts and result are kept (on its call's history row).
    pub history: crate::history::History,
    pub queues: QueueHandle,
    pub outbound: OutboundHandle,
    pub ports: Arc<PortPool>,
    /// Plays to the answered caller and relays the bridge.
    pub clock: Arc<MediaClock>,
    pub agent_contacts: Arc<DashMap<String, (String, Flow)>>,
    pub menu: Arc<MenuHolder>,
    pub default_language: String,
    pub tickets: TicketStore,
    pub limits: Limits,
    /// How log lines show the caller's number.
    pub log: LogConfig,
    pub tracker: TaskTracker,
    /// Server stop: pending call-backs become flagged tickets.
    pub cancel: CancellationToken,
}

impl Callbacks {
    /// `None` without a trunk (`config` must have passed [`CallbackConfig::check`]).
    pub fn new(config: &CallbackConfig, deps: CallbackDeps) -> Option<Self> {
        config.trunk_uri.as_ref()?;
        Some(Callbacks {
            inner: Arc::new(Inner {
                config: config.clone(),
                queues: deps.queues,
                outbound: deps.outbound,
                ports: deps.ports,
                clock: deps.clock,
                agent_contacts: deps.agent_contacts,
                menu: deps.menu,
                default_language: deps.default_language,
                tickets: deps.tickets,
                limits: deps.limits,
                log: deps.log,
                tracker: deps.tracker,
                cancel: deps.cancel,
                pending: AtomicUsize::new(0),
                history: deps.history,
            }),
        })
    }

    /// Take over the waiting caller's queue entry: from now on it is a call-back that keeps
    /// its place, and the call may hang up. On `Err` nothing changed in the queue.
    pub async fn keep_place(
        &self,
        req: CallbackRequest,
        recording: CallbackRecording,
    ) -> Result<(), NotKept> {
        let inner = &self.inner;
        if !dialable(&req.number) {
            return Err(NotKept::NotDialable);
        }
        // The call checked this before asking; checked again here, where the dialling is.
        if !e164(&req.number).is_some_and(|n| inner.config.allows(&n)) {
            return Err(NotKept::NotAllowed);
        }
        let target = inner
            .config
            .target_for(&req.number)
            .ok_or(NotKept::NotDialable)?;
        let slot = inner
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < inner.config.max_pending).then_some(n + 1)
            });
        if slot.is_err() {
            return Err(NotKept::TooMany);
        }
        let guard = Pending(self.inner.clone());
        let (tx, rx) = mpsc::channel(EVENTS);
        if !inner.queues.request_callback(req.caller, tx).await {
            return Err(NotKept::NotWaiting);
        }
        // Its own root span: the call that asked is about to end.
        let log = &inner.log;
        let span = info_span!(parent: None, "callback", caller = %log.number(&req.number), call_id = %req.call_id);
        span.in_scope(|| info!(target = %log.uri(&target), queue = %req.queue, "call-back keeps the caller's place"));
        let core = CallbackCore::new(
            req,
            target,
            inner.config.from_user.clone(),
            inner.limits.clone(),
            inner.default_language.clone(),
            inner.menu.get().prompts.clone(),
            inner.log,
            span.clone(),
        )
        .recorded(recording.dir.is_some(), recording.announcement);
        let inner = self.inner.clone();
        let recordings = recording.dir;
        self.inner.tracker.spawn(
            async move {
                let _guard = guard;
                run(inner, core, rx, recordings).await;
            }
            .instrument(span),
        );
        Ok(())
    }
}

/// Counts one pending call-back while alive.
struct Pending(Arc<Inner>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a call-back ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// An operator took the call and one side hung up.
    Served,
    /// The caller hung up (or went silent) before an operator took the call.
    CallerLeft,
    /// Every dial failed.
    Unreached,
    /// Answered, but no operator who could take it is logged in any more.
    NoOperator,
    /// The server is stopping, or the queue went away.
    Shutdown,
}

/// What happens to a call-back, as its driver reports it.
#[derive(Debug)]
pub(crate) enum Input {
    /// What the queue tells the call-back.
    Queue(CallbackEvent),
    /// The queue forgot the call-back (stopped, or the operator logged out mid-call).
    QueueGone,
    /// An event of the caller's leg or the operator's (`None`: the UA forgot the leg).
    Leg(LegId, Option<LegEvent>),
    /// A leg's INVITE is out, or could not be sent.
    Placed(LegId, Result<Placed, NotPlaced>),
    /// What was queued to play to the answered caller has played (stale notes are dropped).
    PlayDone,
    /// No media from the answered caller for `limits.no_media_seconds`.
    NoMedia,
    /// The bridged operator's phone sent nothing for `limits.operator_silence_seconds`.
    LegSilent,
    /// The bridged operator's browser leg lost its media (ICE, DTLS or consent failed).
    LegMediaFailed,
    /// The flagged ticket asked for by [`Action::FileTicket`] is durable (`true`), or not.
    Filed(bool),
    /// The server is stopping.
    Shutdown,
}

/// What the queue is told about the call-back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum QueueCommand {
    CallbackAnswered,
    CallbackFailed,
    OfferAnswered(String),
    OfferFailed(String, OfferFailure),
    /// Not rung: one operator leg at a time.
    OfferWithdrawn(String),
    Abandon,
    CallEnded(String),
}

/// What the call-back's core asks its driver to do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Place a leg (the caller through the trunk, or an operator's phone).
    PlaceLeg(Box<PlaceLeg>),
    DropLeg {
        leg: LegId,
        how: LegEnd,
    },
    /// The caller answered on `leg`: its RTP port becomes the call's slot on the media clock,
    /// with this media, taken from these sources.
    AttachCaller {
        leg: LegId,
        media: Media,
        scope: LatchScope,
    },
    /// No more RTP to the caller.
    EndCallerMedia,
    Play(Vec<Arc<Prompt>>),
    StopPlayback,
    /// Bridge the answered caller to the operator's leg, or end the bridge.
    SetBridge(Option<BridgeTo>),
    RearmLegWatch,
    RequestLeg {
        leg: LegId,
        req: u64,
        method: Method,
    },
    ReplyLeg {
        leg: LegId,
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
    },
    /// Answer a request a leg's phone sent (REFER).
    AnswerLegRequest {
        leg: LegId,
        txn: u64,
        code: u16,
        headers: Vec<(String, String)>,
    },
    Queue(QueueCommand),
    /// File the flagged ticket that stands in for this call-back; [`Input::Filed`] follows.
    FileTicket(Box<NewTicket>),
    /// The call-back is over.
    End(End),
}

/// The caller's leg, through the trunk.
#[derive(Debug)]
enum Trunk {
    /// Not dialled (waiting for the queue's turn), or the last attempt is over.
    Idle,
    /// The INVITE is being sent.
    Dialling { leg: LegId, ring_timeout: Duration },
    /// The caller's phone rings until `until`; the INVITE went to `toward`.
    Ringing {
        leg: LegId,
        until: Instant,
        toward: Option<IpAddr>,
    },
    /// The caller answered; `limits.max_call_seconds` ends the call at `hang_up_at`.
    Answered { leg: LegId, hang_up_at: Instant },
}

impl Trunk {
    fn leg(&self) -> Option<LegId> {
        match self {
            Trunk::Idle => None,
            Trunk::Dialling { leg, .. }
            | Trunk::Ringing { leg, .. }
            | Trunk::Answered { leg, .. } => Some(*leg),
        }
    }
}

/// The call-back's timers, in the order they are looked at.
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// The caller's phone rings too long.
    TrunkRing = 0,
    /// The operator's leg: its ring deadline, or its silence probe's.
    Operator = 1,
    /// `limits.max_call_seconds` from the caller's answer.
    MaxCall = 2,
}

const TIMERS: [Timer; 3] = [Timer::TrunkRing, Timer::Operator, Timer::MaxCall];

/// One call-back, sans-IO: the caller's leg through the trunk, the operator's leg
/// ([`OperatorLeg`]), and the queue entry between them.
pub(crate) struct CallbackCore {
    req: CallbackRequest,
    /// The URI that reaches the caller through the trunk.
    target: String,
    from_user: String,
    limits: Limits,
    default_language: String,
    /// The prompts the call-back started with.
    prompts: Arc<PromptStore>,
    /// How log lines show the target.
    log: LogConfig,
    trunk: Trunk,
    operator: Option<OperatorLeg>,
    /// The operator's span's parent.
    span: Span,
    legs: LegIds,
    timers: [Option<Instant>; 3],
    /// Prompts are queued or playing to the answered caller.
    playing: bool,
    /// The answered caller's codec (offered first to the operator).
    caller_codec: Option<Codec>,
    /// An operator answered: the call is theirs.
    served: bool,
    /// End once the prompts queued now have played.
    end_after_play: Option<End>,
    /// The flagged ticket that stands in for this call-back is already written.
    ticket_filed: bool,
    /// Waiting for [`Input::Filed`] after `MaxWait`.
    filing: bool,
    bridged: Option<BridgeTo>,
    /// The queue records its talks with operators: so is the bridge.
    record: bool,
    /// The queue's `record_announcement`, played after `callback_hello`.
    announcement: Option<String>,
    /// The announcement is queued or playing: no operator is rung until it has played.
    announcing: bool,
    /// The queue's offer that came while the announcement played: rung once it has.
    deferred: Option<Deferred>,
    ended: bool,
    actions: VecDeque<Action>,
}

/// An offer held back until the recording announcement has played.
#[derive(Debug)]
struct Deferred {
    agent: String,
    ring_timeout: Duration,
    /// When the queue made the offer (it expects an outcome within its ring timeout).
    offered: Instant,
}

impl CallbackCore {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        req: CallbackRequest,
        target: String,
        from_user: String,
        limits: Limits,
        default_language: String,
        prompts: Arc<PromptStore>,
        log: LogConfig,
        span: Span,
    ) -> CallbackCore {
        CallbackCore {
            req,
            target,
            from_user,
            limits,
            default_language,
            prompts,
            log,
            trunk: Trunk::Idle,
            operator: None,
            span,
            legs: LegIds,
            timers: [None; 3],
            playing: false,
            caller_codec: None,
            served: false,
            end_after_play: None,
            ticket_filed: false,
            filing: false,
            bridged: None,
            record: false,
            announcement: None,
            announcing: false,
            deferred: None,
            ended: false,
            actions: VecDeque::new(),
        }
    }

    /// The queue records the talk with the operator (`record`), and the caller hears
    /// `announcement` after `callback_hello`, before any operator is rung.
    pub(crate) fn recorded(mut self, record: bool, announcement: Option<String>) -> Self {
        self.record = record;
        self.announcement = announcement;
        self
    }

    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.ended {
            return None;
        }
        self.timers.iter().flatten().min().copied()
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        for t in TIMERS {
            if self.ended {
                return;
            }
            if self.timers[t as usize].is_none_or(|at| now < at) {
                continue;
            }
            self.timers[t as usize] = None;
            match t {
                Timer::TrunkRing => {
                    info!("the caller did not answer the call-back in time");
                    self.drop_trunk();
                    self.queue(QueueCommand::CallbackFailed);
                }
                Timer::Operator => {
                    let Some(leg) = self.operator.as_mut() else {
                        continue;
                    };
                    let step = leg.on_timeout(now);
                    self.operator_step(step);
                }
                Timer::MaxCall => {
                    info!("call-back reached the maximum call length; hanging up");
                    self.caller_gone();
                }
            }
        }
        self.settle();
    }

    pub(crate) fn handle(&mut self, now: Instant, input: Input) {
        if self.ended {
            return;
        }
        match input {
            Input::Queue(ev) => self.on_queue_event(now, ev),
            // A call in progress goes on; a caller not yet served is filed.
            Input::QueueGone if self.served => {}
            Input::QueueGone | Input::Shutdown => self.end(End::Shutdown),
            Input::Leg(id, ev) if self.trunk.leg() == Some(id) => self.on_trunk_event(now, ev),
            Input::Leg(id, ev) => {
                let Some(leg) = self.operator.as_mut().filter(|l| l.id == id) else {
                    return;
                };
                let step = leg.on_event(ev);
                self.operator_step(step);
            }
            Input::Placed(id, placed) => self.on_placed(now, id, placed),
            Input::PlayDone => {
                self.playing = false;
                // A note from the time of the bridge is stale, unless the operator holds the
                // call: then the hold music loops.
                let held = self.operator.as_ref().is_some_and(OperatorLeg::holds);
                if self.bridged.is_some_and(|b| b.answered) && !held {
                    return;
                }
                if let Some(end) = self.end_after_play {
                    self.end(end);
                    return;
                }
                if std::mem::take(&mut self.announcing) {
                    self.announced(now);
                }
                self.hold_music();
            }
            Input::NoMedia => {
                info!(
                    seconds = self.limits.no_media_seconds,
                    "no media from the called-back caller; hanging up"
                );
                self.caller_gone();
            }
            Input::LegSilent => {
                // As for a live call's operator: ask first.
                let silence = Duration::from_secs(self.limits.operator_silence_seconds);
                let Some(leg) = self.operator.as_mut() else {
                    return;
                };
                let step = leg.on_silent(now, silence);
                self.operator_step(step);
            }
            Input::LegMediaFailed => {
                let Some(leg) = self.operator.as_mut() else {
                    return;
                };
                let step = leg.on_media_failed("the browser's ICE, DTLS or consent failed");
                self.operator_step(step);
            }
            Input::Filed(saved) => self.filed(saved),
        }
        self.settle();
    }

    /// Tell the driver where the bridge goes, if that changed, and set the timers.
    fn settle(&mut self) {
        if self.ended {
            return;
        }
        let bridge = self.operator.as_ref().and_then(|leg| {
            Some(BridgeTo {
                leg: leg.id,
                media: leg.media()?,
                scope: leg.scope(),
                answered: true,
                operator: true,
                record: self.record,
            })
        });
        if bridge != self.bridged && matches!(self.trunk, Trunk::Answered { .. }) {
            self.bridged = bridge;
            self.actions.push_back(Action::SetBridge(bridge));
        }
        self.timers[Timer::TrunkRing as usize] = match self.trunk {
            Trunk::Ringing { until, .. } => Some(until),
            _ => None,
        };
        self.timers[Timer::Operator as usize] =
            self.operator.as_ref().and_then(OperatorLeg::next_deadline);
        self.timers[Timer::MaxCall as usize] = match self.trunk {
            Trunk::Answered { hang_up_at, .. } => Some(hang_up_at),
            _ => None,
        };
    }

    fn queue(&mut self, cmd: QueueCommand) {
        self.actions.push_back(Action::Queue(cmd));
    }

    fn prompts(&self, names: &[&str]) -> Vec<Arc<Prompt>> {
        names
            .iter()
            .filter_map(|n| {
                let p = (self.prompts.get(&self.req.language, n))
                    .or_else(|| self.prompts.get(&self.default_language, n));
                if p.is_none() {
                    warn!(prompt = %n, language = %self.req.language, "prompt missing; skipped");
                }
                p
            })
            .collect()
    }

    fn play(&mut self, names: &[&str]) {
        let p = self.prompts(names);
        if !p.is_empty() {
            self.playing = true;
            self.actions.push_back(Action::Play(p));
        }
    }

    fn stop_playback(&mut self) {
        self.playing = false;
        self.actions.push_back(Action::StopPlayback);
    }

    /// Back to hold music while the next operator is tried (if the caller answered and
    /// nothing plays).
    fn hold_music(&mut self) {
        if matches!(self.trunk, Trunk::Answered { .. }) && !self.playing {
            self.play(&["hold_music"]);
        }
    }

    fn on_queue_event(&mut self, now: Instant, ev: CallbackEvent) {
        match ev {
            CallbackEvent::DialBack {
                attempt,
                ring_timeout,
            } => {
                if matches!(self.trunk, Trunk::Idle) {
                    self.dial(attempt, ring_timeout);
                }
            }
            CallbackEvent::Unreached => self.end(End::Unreached),
            CallbackEvent::Queue(QueueEvent::Offer {
                agent,
                ring_timeout,
            }) => self.offer_agent(now, agent, ring_timeout),
            CallbackEvent::Queue(QueueEvent::CancelOffer { agent }) => {
                if self.deferred.as_ref().is_some_and(|d| d.agent == agent) {
                    self.deferred = None;
                }
                let ringing =
                    (self.operator.as_ref()).is_some_and(|l| l.agent == agent && l.ringing());
                if ringing {
                    self.drop_operator(LegEnd::HangUpAndRelease);
                    self.hold_music();
                }
            }
            CallbackEvent::Queue(QueueEvent::Announce(_)) => {}
            CallbackEvent::Queue(QueueEvent::MaxWait) => {
                if self.served {
                    return;
                }
                info!("no operator can take the called-back caller; filing a ticket instead");
                self.deferred = None;
                self.announcing = false;
                self.drop_operator(LegEnd::HangUpAndRelease);
                self.queue(QueueCommand::Abandon);
                // The flagged ticket is written first: only a saved request is promised.
                self.ticket_filed = true;
                self.filing = true;
                self.file_ticket("Call-back answered, but no operator could take the call");
            }
        }
    }

    /// The flagged ticket of `MaxWait` is written (or not): the caller hears which, and the
    /// call-back ends.
    fn filed(&mut self, saved: bool) {
        if !std::mem::take(&mut self.filing) {
            return;
        }
        if matches!(self.trunk, Trunk::Answered { .. }) {
            self.stop_playback();
            self.play(&[if saved {
                "callback_confirmed"
            } else {
                "db_error"
            }]);
            self.end_after_play = Some(End::NoOperator);
            if !self.playing {
                self.end(End::NoOperator);
            }
        } else {
            self.end(End::NoOperator);
        }
    }

    /// Ring the caller back through the trunk. A trunk named with several addresses is
    /// dialled at each in turn, an attempt each (the name looked up afresh every time): one
    /// address down costs an attempt, not every one.
    fn dial(&mut self, attempt: u32, ring_timeout: Duration) {
        let leg = self.legs.next();
        info!(target = %self.log.uri(&self.target), attempt, "calling the caller back");
        let place = PlaceLeg {
            leg,
            to: Dial::Uri {
                uri: self.target.clone(),
                at: None,
                pick: attempt.max(1) as usize - 1,
            },
            from_user: self.from_user.clone(),
            from_display: "311",
            asserted: Some(self.from_user.clone()),
            headers: vec![
                ("X-311-Callback".to_owned(), "yes".to_owned()),
                ("X-311-Call-ID".to_owned(), self.req.call_id.clone()),
            ],
            codec: Codec::Pcmu,
            local_ip: self.req.local_ip,
            span: self.span.clone(),
        };
        self.trunk = Trunk::Dialling { leg, ring_timeout };
        self.actions.push_back(Action::PlaceLeg(Box::new(place)));
    }

    fn on_placed(&mut self, now: Instant, id: LegId, placed: Result<Placed, NotPlaced>) {
        if let Trunk::Dialling { leg, ring_timeout } = self.trunk {
            if leg == id {
                match placed {
                    Ok(p) => {
                        self.trunk = Trunk::Ringing {
                            leg,
                            until: now + ring_timeout,
                            toward: p.toward,
                        }
                    }
                    Err(why) => {
                        warn!(reason = %why, "the call-back could not be dialled; counted as unanswered");
                        self.trunk = Trunk::Idle;
                        self.queue(QueueCommand::CallbackFailed);
                    }
                }
                return;
            }
        }
        let Some(leg) = self.operator.as_mut().filter(|l| l.id == id) else {
            return;
        };
        match placed {
            Ok(p) => leg.placed(now, p.sdp, p.toward),
            Err(why) => {
                let agent = leg.agent.clone();
                warn!(%agent, reason = %why, "cannot ring the operator for the call-back");
                self.operator = None;
                self.queue(QueueCommand::OfferFailed(agent, OfferFailure::Unreachable));
            }
        }
    }

    fn on_trunk_event(&mut self, now: Instant, ev: Option<LegEvent>) {
        let Some(ev) = ev else {
            // The UA forgot the leg: the caller is gone.
            self.trunk = Trunk::Idle;
            self.caller_gone();
            return;
        };
        match ev {
            LegEvent::Provisional { code, .. } => debug!(code, "call-back ringing"),
            LegEvent::Answered { sdp: body } => {
                let Trunk::Ringing { leg, toward, .. } = self.trunk else {
                    // Answered twice (a forked INVITE): the first answer has the port.
                    warn!("a second answer to the call-back ignored");
                    return;
                };
                match leg_answer(&body) {
                    Ok(media) => {
                        info!(codec = ?media.0.codec, "the caller answered the call-back");
                        self.caller_codec = Some(media.0.codec);
                        let scope = toward.map_or(LatchScope::Sdp, LatchScope::SdpOr);
                        let max_call = Duration::from_secs(self.limits.max_call_seconds);
                        self.actions
                            .push_back(Action::AttachCaller { leg, media, scope });
                        self.trunk = Trunk::Answered {
                            leg,
                            hang_up_at: now + max_call,
                        };
                        self.greet();
                        self.queue(QueueCommand::CallbackAnswered);
                    }
                    Err(e) => {
                        warn!(error = %e, "the call-back was answered with unusable SDP");
                        self.drop_trunk();
                        self.queue(QueueCommand::CallbackFailed);
                    }
                }
            }
            LegEvent::Failed { code, reason } => {
                info!(code, %reason, "the call-back did not get through");
                if let Some(leg) = self.trunk.leg() {
                    self.actions.push_back(Action::DropLeg {
                        leg,
                        how: LegEnd::HangUpAndRelease,
                    });
                }
                self.trunk = Trunk::Idle;
                self.queue(QueueCommand::CallbackFailed);
            }
            LegEvent::Dialog(DialogEvent::Bye | DialogEvent::Timeout | DialogEvent::Lost) => {
                info!("the caller hung up");
                if let Some(leg) = self.trunk.leg() {
                    self.actions.push_back(Action::EndCallerMedia);
                    self.actions.push_back(Action::DropLeg {
                        leg,
                        how: LegEnd::Release,
                    });
                }
                self.trunk = Trunk::Idle;
                self.caller_gone();
            }
            LegEvent::Dialog(DialogEvent::Refer(r)) => {
                // The called-back caller's side cannot make the city's server dial out.
                if let Some(leg) = self.trunk.leg() {
                    self.refuse_refer(leg, r.txn, "a caller's line cannot transfer the call");
                }
            }
            LegEvent::Dialog(_) => {}
        }
    }

    /// Answer a REFER on `leg` with 403 (transfers are taken on live calls' operator legs).
    fn refuse_refer(&mut self, leg: LegId, txn: u64, why: &str) {
        info!(reason = why, "REFER on a call-back refused");
        self.actions.push_back(Action::AnswerLegRequest {
            leg,
            txn,
            code: 403,
            headers: vec![("Warning".into(), format!("399 ivr311 \"{why}\""))],
        });
    }

    /// The answered caller left: end the operator's side too.
    fn caller_gone(&mut self) {
        if self.served {
            self.end(End::Served);
            return;
        }
        self.drop_operator(LegEnd::HangUpAndRelease);
        self.queue(QueueCommand::Abandon);
        self.end(End::CallerLeft);
    }

    /// The answered caller hears `callback_hello`, then the queue's recording announcement
    /// (if it has one) in full before any operator is rung, then hold music.
    fn greet(&mut self) {
        let announcement = self.announcement.clone();
        let announced = announcement
            .as_deref()
            .is_some_and(|a| !self.prompts(&[a]).is_empty());
        match announcement.filter(|_| announced) {
            Some(a) => {
                self.play(&["callback_hello", a.as_str()]);
                self.announcing = self.playing;
            }
            None => self.play(&["callback_hello", "hold_music"]),
        }
    }

    /// The recording announcement has played: ring the operator the queue offered meanwhile,
    /// for what is left of the queue's ring time (the queue gives up on an offer it hears
    /// nothing of after that), or, with less than [`MIN_RING`] left, give the offer back at
    /// no cost to the agent so the queue makes a fresh one.
    fn announced(&mut self, now: Instant) {
        let Some(d) = self.deferred.take() else {
            return;
        };
        let left = d
            .ring_timeout
            .saturating_sub(now.saturating_duration_since(d.offered));
        if left < MIN_RING {
            debug!(agent = %d.agent, "offer outlived by the announcement; given back");
            self.queue(QueueCommand::OfferWithdrawn(d.agent));
            return;
        }
        self.offer_agent(now, d.agent, left);
    }

    /// Ring an operator for the answered caller. One operator leg at a time: the other phones
    /// of a `ring_all` round are not rung for a call-back, and that costs their agents
    /// nothing.
    fn offer_agent(&mut self, now: Instant, agent: String, ring_timeout: Duration) {
        if self.operator.is_some() || self.deferred.is_some() {
            debug!(%agent, "already ringing an operator; offer withdrawn");
            self.queue(QueueCommand::OfferWithdrawn(agent));
            return;
        }
        if self.announcing {
            debug!(%agent, "the recording announcement is playing; the operator is rung after it");
            self.deferred = Some(Deferred {
                agent,
                ring_timeout,
                offered: now,
            });
            return;
        }
        let codec = match (&self.trunk, self.caller_codec) {
            (Trunk::Answered { .. }, Some(codec)) => codec,
            _ => {
                warn!(%agent, "cannot ring the operator for the call-back (the caller has not answered)");
                self.queue(QueueCommand::OfferFailed(agent, OfferFailure::Unreachable));
                return;
            }
        };
        let offer = OperatorOffer {
            language: &self.req.language,
            menu_path: &self.req.menu_path,
            queue: &self.req.queue,
            waited: now.saturating_duration_since(self.req.entered).as_secs(),
            call_id: &self.req.call_id,
            callback: true,
        };
        let span = info_span!(parent: &self.span, "agent_leg", %agent);
        let (leg, place) = OperatorLeg::offer(
            self.legs.next(),
            agent,
            &self.req.number,
            &offer,
            codec,
            self.req.local_ip,
            ring_timeout,
            span,
        );
        self.operator = Some(leg);
        self.actions.push_back(Action::PlaceLeg(Box::new(place)));
    }

    /// Carry out what the operator's leg said.
    fn operator_step(&mut self, step: LegStep) {
        let Some(leg) = self.operator.as_ref() else {
            return;
        };
        let (id, agent) = (leg.id, leg.agent.clone());
        match step {
            LegStep::Nothing => {}
            LegStep::Answered => {
                // From the clock's next pass the caller hears the operator (and nothing the
                // operator's phone sent before it answered: the clock drops that).
                self.stop_playback();
                self.served = true;
                self.queue(QueueCommand::OfferAnswered(agent));
            }
            LegStep::Unusable => {
                self.drop_operator(LegEnd::HangUpAndRelease);
                self.agent_failed(agent, OfferFailure::NoCommonCodec);
            }
            LegStep::Failed(why) => {
                self.drop_operator(LegEnd::Forget);
                self.agent_failed(agent, why);
            }
            LegStep::NoAnswer => {
                self.drop_operator(LegEnd::HangUpAndRelease);
                self.agent_failed(agent, OfferFailure::NoAnswer);
            }
            LegStep::HungUp => {
                self.drop_operator(LegEnd::Release);
                self.end(End::Served);
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
                if let Some(c) = change {
                    self.hold_changed(c);
                }
            }
            LegStep::MediaChanged(c) => self.hold_changed(c),
            LegStep::Probe { req } => self.actions.push_back(Action::RequestLeg {
                leg: id,
                req,
                method: Method::Options,
            }),
            LegStep::StillThere => self.actions.push_back(Action::RearmLegWatch),
            LegStep::Gone { .. } | LegStep::Lost => {
                self.drop_operator(LegEnd::HangUpAndRelease);
                self.end(End::Served);
            }
            LegStep::Refer(r) => {
                self.refuse_refer(id, r.txn, "transfers are not available on a call-back")
            }
        }
    }

    /// The caller hears hold music while the operator holds the call.
    fn hold_changed(&mut self, c: MediaChange) {
        if c.held && !c.was_held {
            info!("the operator holds the call; the caller hears hold music");
            self.stop_playback();
            self.hold_music();
        } else if c.was_held && !c.held {
            self.stop_playback();
        }
    }

    fn agent_failed(&mut self, agent: String, why: OfferFailure) {
        self.queue(QueueCommand::OfferFailed(agent, why));
        self.hold_music();
    }

    fn drop_operator(&mut self, how: LegEnd) {
        if let Some(mut leg) = self.operator.take() {
            leg.drop_leg();
            if self.bridged.take().is_some() {
                self.actions.push_back(Action::SetBridge(None));
            }
            self.actions.push_back(Action::DropLeg { leg: leg.id, how });
        }
    }

    fn drop_trunk(&mut self) {
        if let Some(leg) = self.trunk.leg() {
            // Nothing more is sent to a phone we are hanging up on.
            if matches!(self.trunk, Trunk::Answered { .. }) {
                self.actions.push_back(Action::EndCallerMedia);
            }
            self.actions.push_back(Action::DropLeg {
                leg,
                how: LegEnd::HangUpAndRelease,
            });
        }
        self.trunk = Trunk::Idle;
    }

    /// The flagged ticket that stands in for this call-back, `why` its description.
    fn file_ticket(&mut self, why: &str) {
        let r = &self.req;
        let t = flagged_ticket(why, &r.number, &r.language, &r.call_id);
        self.actions.push_back(Action::FileTicket(Box::new(t)));
    }

    /// The call-back is over: both legs are let go of, the queue told, and a call-back that
    /// did not happen becomes a flagged ticket.
    fn end(&mut self, end: End) {
        if self.ended {
            return;
        }
        let agent = self.operator.as_ref().map(|l| l.agent.clone());
        self.drop_operator(LegEnd::HangUpAndRelease);
        self.drop_trunk();
        match (end, self.served) {
            (_, true) => match agent {
                Some(agent) => self.queue(QueueCommand::CallEnded(agent)),
                // The agent's BYE already dropped the leg: the queue knows the agent by the
                // caller.
                None => self.queue(QueueCommand::Abandon),
            },
            // The queue may be gone already; if not, free the place.
            (End::Shutdown, false) => self.queue(QueueCommand::Abandon),
            _ => {}
        }
        info!(?end, served = self.served, "call-back finished");
        let why = match (end, self.served) {
            (_, true) | (End::CallerLeft, _) | (End::Served, _) => None,
            (End::Unreached, _) => {
                Some("Call-back requested; the caller did not answer any attempt")
            }
            (End::NoOperator, _) if self.ticket_filed => None,
            (End::NoOperator, _) => Some("Call-back answered, but no operator could take the call"),
            (End::Shutdown, _) => Some("Call-back still pending when the server stopped"),
        };
        if let Some(why) = why {
            self.file_ticket(why);
        }
        self.ended = true;
        self.actions.push_back(Action::End(end));
    }
}

/// A call-back's task: carries out what its core asks, and feeds it what happens.
async fn run(
    inner: Arc<Inner>,
    mut core: CallbackCore,
    events: mpsc::Receiver<CallbackEvent>,
    recordings: Option<PathBuf>,
) {
    let mut d = CallbackDriver {
        caller: core.req.caller,
        call_id: core.req.call_id.clone(),
        recordings,
        inner,
        legs: Legs::default(),
        media: None,
        notes: None,
        ended: false,
        end: None,
    };
    let mut events = Some(events);
    let mut attempts = 0;
    let cancel = d.inner.cancel.clone();
    loop {
        while let Some(a) = core.poll_action() {
            if let Some(input) = d.carry_out(a).await {
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
            ev = recv_opt(&mut events) => match ev {
                Some(ev) => {
                    if let CallbackEvent::DialBack { attempt, .. } = ev {
                        attempts = attempt;
                    }
                    core.handle(now(), Input::Queue(ev))
                }
                None => {
                    events = None;
                    core.handle(now(), Input::QueueGone);
                }
            },
            (leg, ev) = d.legs.next() => core.handle(now(), Input::Leg(leg, ev)),
            note = recv_opt(&mut d.notes) => match note {
                // The clock stopped (the server is stopping; the cancel token ends us).
                None => d.notes = None,
                Some(note) => {
                    if let Some(input) = d.on_note(note) {
                        core.handle(now(), input);
                    }
                }
            },
            () = sleep_opt(deadline) => core.handle_timeout(now()),
        }
    }
    d.legs.hang_up_all().await;
    let result = match d.end {
        Some(End::Served) => "served",
        Some(End::CallerLeft | End::NoOperator) => "answered",
        Some(End::Unreached) => "unreached",
        Some(End::Shutdown) | None => "stopped",
    };
    d.inner
        .history
        .record(crate::history::Record::CallbackResult {
            call_id: core.req.call_id.clone(),
            attempts,
            result,
        });
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

/// Record the bridge on `slot` to the recording of the call `call_id` under `dir` (appended
/// to it if that call was recorded already), as a live call's bridge is.
fn start_recording(
    slot: &mut crate::media::clock::SlotState,
    dir: &std::path::Path,
    call_id: &str,
    tracker: &TaskTracker,
) {
    match crate::media::call_record::spawn_writer(dir, call_id, tracker) {
        Ok(tap) => {
            info!("recording the talk with the operator");
            slot.set_call_tap(Some(tap));
        }
        Err(e) => warn!(error = %e, "the talk with the operator cannot be recorded"),
    }
}

/// The IO of one call-back.
struct CallbackDriver {
    inner: Arc<Inner>,
    /// The caller's queue entry.
    caller: CallerId,
    /// The Call-ID of the call that asked for the call-back: its recording is this one's.
    call_id: String,
    /// Where the talk with the operator is recorded (`None`: the queue does not record).
    recordings: Option<PathBuf>,
    legs: Legs,
    /// The answered caller's slot on the media clock, and what the clock says of it.
    media: Option<MediaHandle>,
    notes: Option<mpsc::Receiver<MediaNote>>,
    ended: bool,
    /// How the call-back ended, for the call history.
    end: Option<End>,
}

impl CallbackDriver {
    fn on_note(&mut self, note: MediaNote) -> Option<Input> {
        match note {
            // A note from before the queue changed, or from before the bridge, is stale.
            MediaNote::PlayDone { stops } => {
                let st = self.media.as_ref()?.lock();
                (!st.media.is_playing() && st.media.stops() == stops).then_some(Input::PlayDone)
            }
            MediaNote::NoMedia => Some(Input::NoMedia),
            MediaNote::LegSilent => Some(Input::LegSilent),
            MediaNote::LegMediaFailed => Some(Input::LegMediaFailed),
            // Keys reach the operator through the bridge; the talk's recording (a call tap)
            // sends no notes, and a call-back records no description.
            MediaNote::Digit(_) | MediaNote::RecordingData | MediaNote::RecordingEnded => None,
        }
    }

    async fn carry_out(&mut self, a: Action) -> Option<Input> {
        let inner = &self.inner;
        match a {
            Action::PlaceLeg(p) => {
                let leg = p.leg;
                let deps = LegDeps {
                    ports: &inner.ports,
                    outbound: &inner.outbound,
                    agent_contacts: &inner.agent_contacts,
                };
                let (placed, io) = place_leg(&deps, *p).await;
                if let Some(io) = io {
                    self.legs.add(io);
                }
                return Some(Input::Placed(leg, placed));
            }
            Action::DropLeg { leg, how } => self.legs.drop_leg(leg, how).await,
            Action::AttachCaller { leg, media, scope } => {
                let port = (self.legs.get_mut(leg))
                    .and_then(|l| l.port.take())
                    .and_then(|p| Arc::try_unwrap(p).ok());
                let Some(port) = port else {
                    warn!("the call-back's RTP port is gone; hanging up");
                    return Some(Input::NoMedia);
                };
                // Early media (the trunk's ringback) is not the caller.
                port.discard_queued();
                let no_media = Duration::from_secs(inner.limits.no_media_seconds);
                let session = MediaSession::new(now(), media.0, media.1).latch_scope(scope);
                let (m, notes) = inner.clock.attach(port, session, no_media, Span::current());
                self.media = Some(m);
                self.notes = Some(notes);
            }
            Action::EndCallerMedia => {
                if let Some(m) = &self.media {
                    m.end();
                }
                self.notes = None;
            }
            Action::Play(p) => {
                if let Some(m) = &self.media {
                    m.lock().media.play(p);
                }
            }
            Action::StopPlayback => {
                if let Some(m) = &self.media {
                    m.lock().media.stop();
                }
            }
            Action::SetBridge(b) => {
                let silence = Duration::from_secs(inner.limits.operator_silence_seconds);
                let record = b.is_some_and(|b| b.record);
                let bridge = b.and_then(|b| bridge_for(self.legs.get(b.leg)?, &b, silence));
                let bridged = bridge.is_some();
                if let Some(m) = &self.media {
                    let mut slot = m.lock();
                    slot.set_bridge(bridge);
                    match &self.recordings {
                        Some(dir) if record && bridged => {
                            if !slot.recording_call() {
                                start_recording(&mut slot, dir, &self.call_id, &inner.tracker);
                            }
                        }
                        _ => slot.set_call_tap(None),
                    }
                }
            }
            Action::RearmLegWatch => {
                if let Some(m) = &self.media {
                    m.lock().rearm_leg_watch(std::time::Instant::now());
                }
            }
            Action::RequestLeg { leg, req, method } => {
                if let Some(l) = self.legs.get(leg) {
                    l.handle.request(req, method, vec![], None).await;
                }
            }
            Action::AnswerLegRequest {
                leg,
                txn,
                code,
                headers,
            } => {
                if let Some(l) = self.legs.get(leg) {
                    l.handle.answer_request(txn, code, headers).await;
                }
            }
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
            Action::Queue(cmd) => {
                let (q, caller) = (&inner.queues, self.caller);
                match cmd {
                    QueueCommand::CallbackAnswered => q.callback_answered(caller).await,
                    QueueCommand::CallbackFailed => q.callback_failed(caller).await,
                    QueueCommand::OfferAnswered(agent) => q.offer_answered(caller, &agent).await,
                    QueueCommand::OfferFailed(agent, why) => {
                        q.offer_failed(caller, &agent, why).await
                    }
                    QueueCommand::OfferWithdrawn(agent) => q.offer_withdrawn(caller, &agent).await,
                    QueueCommand::Abandon => q.abandon(caller).await,
                    QueueCommand::CallEnded(agent) => q.call_ended(&agent).await,
                }
            }
            Action::FileTicket(t) => {
                return Some(Input::Filed(file_flagged(&inner.tickets, *t).await));
            }
            Action::End(end) => {
                debug!(?end, "call-back task done");
                self.ended = true;
                self.end = Some(end);
            }
        }
        None
    }
}

/// A ticket flagged for call-back: the general service, the caller's number to call, `why`
/// as its description. It stands in for a call-back the server could not make (or was not
/// configured to make).
pub fn flagged_ticket(why: &str, number: &str, language: &str, call_id: &str) -> NewTicket {
    NewTicket {
        service_code: crate::menu::engine::GENERAL_SERVICE.into(),
        service_name: crate::menu::engine::GENERAL_SERVICE_NAME.into(),
        description: Some(why.to_owned()),
        phone: Some(number.to_owned()),
        channel: Channel::Phone,
        language: Some(language.to_owned()),
        call_id: Some(call_id.to_owned()),
        callback_requested: true,
        ..NewTicket::default()
    }
}

/// Write a flagged ticket, logging the outcome; whether it is durable.
pub async fn file_flagged(store: &TicketStore, t: NewTicket) -> bool {
    match store.file(t).await {
        Ok(t) => {
            info!(id = t.service_request_id, "call-back ticket filed");
            true
        }
        Err(e) => {
            error!(error = %e, "call-back ticket could not be filed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call-back under test, on its own clock, with the driver's immediate answers.
    struct Cb {
        core: CallbackCore,
        t0: Instant,
        now: Instant,
    }

    impl Cb {
        fn new() -> Cb {
            let mut prompts = PromptStore::new();
            for name in [
                "callback_hello",
                "hold_music",
                "callback_confirmed",
                "db_error",
                "call_recorded",
            ] {
                prompts.insert("en", Prompt::from_pcm(name, &[0; 160], 8000, 1).unwrap());
            }
            let t0 = Instant::now();
            let req = CallbackRequest {
                caller: 3,
                number: "+12122000123".into(),
                call_id: "call-1@test".into(),
                language: "en".into(),
                menu_path: "language:1 > screening:1 > main:0".into(),
                queue: "general".into(),
                entered: t0,
                local_ip: "192.0.2.1".parse().unwrap(),
            };
            let core = CallbackCore::new(
                req,
                "sip:+12122000123@trunk.example.net".into(),
                "311".into(),
                Limits::default(),
                "en".into(),
                Arc::new(prompts),
                LogConfig::default(),
                Span::none(),
            );
            Cb { core, t0, now: t0 }
        }

        /// A call-back of a queue that records, with a recording announcement.
        fn recorded() -> Cb {
            let mut c = Cb::new();
            c.core = c.core.recorded(true, Some("call_recorded".into()));
            c
        }

        fn drive(&mut self) -> Vec<Action> {
            let mut all = Vec::new();
            while let Some(a) = self.core.poll_action() {
                let answer = match &a {
                    Action::PlaceLeg(p) => Some(Input::Placed(
                        p.leg,
                        Ok(Placed {
                            sdp: super::super::leg::LegSdp::new("192.0.2.1:30000".parse().unwrap()),
                            toward: Some("198.51.100.30".parse().unwrap()),
                            looked_up: None,
                        }),
                    )),
                    Action::FileTicket(_) => Some(Input::Filed(true)),
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

        fn at(&mut self, secs: u64) -> Vec<Action> {
            self.now = self.t0 + Duration::from_secs(secs);
            self.core.handle_timeout(self.now);
            self.drive()
        }

        fn dial(&mut self, attempt: u32) -> (LegId, Vec<Action>) {
            let out = self.input(Input::Queue(CallbackEvent::DialBack {
                attempt,
                ring_timeout: Duration::from_secs(30),
            }));
            (placed(&out).expect("dialled").0, out)
        }

        /// Dialled and answered: the trunk leg.
        fn answered(&mut self) -> LegId {
            let (leg, _) = self.dial(1);
            self.input(Input::Leg(leg, Some(answer("198.51.100.30", 6000))));
            leg
        }

        fn offer(&mut self, agent: &str) -> Vec<Action> {
            self.input(Input::Queue(CallbackEvent::Queue(QueueEvent::Offer {
                agent: agent.into(),
                ring_timeout: Duration::from_secs(20),
            })))
        }
    }

    fn answer(ip: &str, port: u16) -> LegEvent {
        LegEvent::Answered {
            sdp: format!("v=0\r\no=x 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 8 101\r\na=rtpmap:101 telephone-event/8000\r\n").into(),
        }
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

    fn prompts(out: &[Action]) -> Vec<String> {
        out.iter()
            .filter_map(|a| match a {
                Action::Play(p) => Some(p.iter().map(|p| p.name.clone())),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn ticket(out: &[Action]) -> Option<&NewTicket> {
        out.iter().find_map(|a| match a {
            Action::FileTicket(t) => Some(&**t),
            _ => None,
        })
    }

    fn ended(out: &[Action]) -> Option<End> {
        out.iter().find_map(|a| match a {
            Action::End(e) => Some(*e),
            _ => None,
        })
    }

    #[test]
    fn the_caller_is_dialled_from_311_at_the_attempts_address_and_hears_the_greeting() {
        let mut c = Cb::new();
        let (leg, out) = c.dial(2);
        let p = placed(&out).unwrap().1;
        assert_eq!(
            p.to,
            Dial::Uri {
                uri: "sip:+12122000123@trunk.example.net".into(),
                at: None,
                pick: 1
            }
        );
        assert_eq!((p.from_user.as_str(), p.from_display), ("311", "311"));
        assert_eq!(p.asserted.as_deref(), Some("311"));
        assert!(p.headers.contains(&("X-311-Callback".into(), "yes".into())));
        let out = c.input(Input::Leg(leg, Some(answer("198.51.100.30", 6000))));
        let Some(Action::AttachCaller { scope, media, .. }) = out.first() else {
            panic!("{out:?}")
        };
        assert_eq!(*scope, LatchScope::SdpOr("198.51.100.30".parse().unwrap()));
        assert_eq!(media.0.codec, Codec::Pcma);
        assert_eq!(prompts(&out), vec!["callback_hello", "hold_music"]);
        assert_eq!(queue_cmds(&out), vec![QueueCommand::CallbackAnswered]);
        // Hold music loops.
        assert_eq!(prompts(&c.input(Input::PlayDone)), vec!["hold_music"]);
    }

    #[test]
    fn a_recorded_queues_callback_announces_before_ringing_and_records_the_bridge() {
        let mut c = Cb::recorded();
        let (trunk, _) = c.dial(1);
        let out = c.input(Input::Leg(trunk, Some(answer("198.51.100.30", 6000))));
        assert_eq!(prompts(&out), vec!["callback_hello", "call_recorded"]);
        assert_eq!(queue_cmds(&out), vec![QueueCommand::CallbackAnswered]);
        // The queue's offer waits for the announcement; a second one is given back.
        assert!(c.offer("1001").is_empty(), "no phone rings during it");
        assert_eq!(
            queue_cmds(&c.offer("1002")),
            vec![QueueCommand::OfferWithdrawn("1002".into())]
        );
        // Played: the operator rings for what is left of the queue's 20 s, and hold music.
        c.now = c.t0 + Duration::from_secs(6);
        let out = c.input(Input::PlayDone);
        let (leg, p) = placed(&out).expect("the operator is rung");
        assert_eq!(p.to, Dial::Agent("1001".into()));
        assert_eq!(prompts(&out), vec!["hold_music"]);
        assert!(c.at(19).is_empty());
        assert_eq!(
            queue_cmds(&c.at(20)),
            vec![QueueCommand::OfferFailed(
                "1001".into(),
                OfferFailure::NoAnswer
            )]
        );
        // The next operator is rung at once, and the bridge is recorded.
        let leg2 = placed(&c.offer("1002")).expect("rung").0;
        assert_ne!(leg, leg2);
        let out = c.input(Input::Leg(leg2, Some(answer("198.51.100.9", 4000))));
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::SetBridge(Some(b)) if b.leg == leg2 && b.record)));
    }

    #[test]
    fn an_offer_outlived_by_the_announcement_is_given_back_and_a_cancelled_one_forgotten() {
        let mut c = Cb::recorded();
        c.answered();
        c.offer("1001");
        c.now = c.t0 + Duration::from_secs(17);
        let out = c.input(Input::PlayDone);
        assert!(placed(&out).is_none());
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::OfferWithdrawn("1001".into())]
        );

        let mut c = Cb::recorded();
        c.answered();
        c.offer("1001");
        c.input(Input::Queue(CallbackEvent::Queue(
            QueueEvent::CancelOffer {
                agent: "1001".into(),
            },
        )));
        let out = c.input(Input::PlayDone);
        assert!(placed(&out).is_none() && queue_cmds(&out).is_empty());
        // A queue that does not record: the bridge is not recorded, and nothing waits.
        let mut c = Cb::new();
        c.answered();
        let leg = placed(&c.offer("1001")).expect("rung at once").0;
        let out = c.input(Input::Leg(leg, Some(answer("198.51.100.9", 4000))));
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::SetBridge(Some(b)) if !b.record)));
    }

    #[test]
    fn a_callback_not_answered_in_time_is_cancelled_and_counted_as_a_failed_attempt() {
        let mut c = Cb::new();
        let (leg, _) = c.dial(1);
        assert!(c.at(29).is_empty());
        let out = c.at(30);
        assert!(out.iter().any(
            |a| matches!(a, Action::DropLeg { leg: l, how: LegEnd::HangUpAndRelease } if *l == leg)
        ));
        assert_eq!(queue_cmds(&out), vec![QueueCommand::CallbackFailed]);
        // The queue dials again later; after the last attempt it gives up: a flagged ticket.
        c.dial(2);
        let out = c.input(Input::Queue(CallbackEvent::Unreached));
        let t = ticket(&out).expect("a flagged ticket");
        assert!(t.callback_requested);
        assert_eq!(t.phone.as_deref(), Some("+12122000123"));
        assert_eq!(ended(&out), Some(End::Unreached));
    }

    #[test]
    fn the_answered_caller_is_offered_to_an_operator_as_a_callback_and_bridged() {
        let mut c = Cb::new();
        let trunk = c.answered();
        let out = c.offer("1001");
        let (leg, p) = placed(&out).unwrap();
        assert_eq!(p.to, Dial::Agent("1001".into()));
        assert_eq!(p.from_user, "+12122000123");
        assert_eq!(p.codec, Codec::Pcma, "the caller's codec first");
        assert!(p.headers.contains(&("X-311-Callback".into(), "yes".into())));
        // A ring_all round's other phones are not rung.
        assert_eq!(
            queue_cmds(&c.offer("1002")),
            vec![QueueCommand::OfferWithdrawn("1002".into())]
        );
        let out = c.input(Input::Leg(leg, Some(answer("198.51.100.9", 4000))));
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::SetBridge(Some(b)) if b.leg == leg && b.operator)));
        assert_eq!(
            queue_cmds(&out),
            vec![QueueCommand::OfferAnswered("1001".into())]
        );
        // The caller's hold music note from before the bridge is stale.
        assert!(c.input(Input::PlayDone).is_empty());
        // The operator hangs up: the call-back is served; nothing is filed.
        let out = c.input(Input::Leg(leg, Some(LegEvent::Dialog(DialogEvent::Bye))));
        assert!(out.iter().any(|a| matches!(a, Action::SetBridge(None))));
        assert!(out.iter().any(
            |a| matches!(a, Action::DropLeg { leg: l, how: LegEnd::HangUpAndRelease } if *l == trunk)
        ));
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert!(ticket(&out).is_none());
        assert_eq!(ended(&out), Some(End::Served));
    }

    #[test]
    fn the_called_back_caller_hanging_up_before_an_operator_answers_cancels_the_offer() {
        let mut c = Cb::new();
        let trunk = c.answered();
        let leg = placed(&c.offer("1001")).unwrap().0;
        let out = c.input(Input::Leg(trunk, Some(LegEvent::Dialog(DialogEvent::Bye))));
        assert!(out.iter().any(
            |a| matches!(a, Action::DropLeg { leg: l, how: LegEnd::HangUpAndRelease } if *l == leg)
        ));
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert!(ticket(&out).is_none(), "a caller who left is not filed");
        assert_eq!(ended(&out), Some(End::CallerLeft));
    }

    #[test]
    fn with_no_operator_left_the_answered_caller_hears_the_ticket_is_filed_then_is_hung_up() {
        let mut c = Cb::new();
        c.answered();
        let out = c.input(Input::Queue(CallbackEvent::Queue(QueueEvent::MaxWait)));
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert!(ticket(&out).is_some(), "filed before it is promised");
        assert_eq!(prompts(&out), vec!["callback_confirmed"]);
        let out = c.input(Input::PlayDone);
        assert!(ticket(&out).is_none(), "filed once");
        assert_eq!(ended(&out), Some(End::NoOperator));
    }

    #[test]
    fn a_callback_pending_at_shutdown_becomes_a_flagged_ticket() {
        let mut c = Cb::new();
        let out = c.input(Input::Shutdown);
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert_eq!(
            ticket(&out).and_then(|t| t.description.as_deref()),
            Some("Call-back still pending when the server stopped")
        );
        assert_eq!(ended(&out), Some(End::Shutdown));
    }

    #[test]
    fn a_silent_operator_on_a_callback_is_asked_then_hung_up() {
        let mut c = Cb::new();
        c.answered();
        let leg = placed(&c.offer("1001")).unwrap().0;
        c.input(Input::Leg(leg, Some(answer("198.51.100.9", 4000))));
        let out = c.input(Input::LegSilent);
        assert!(out.iter().any(|a| matches!(
            a,
            Action::RequestLeg {
                method: Method::Options,
                ..
            }
        )));
        let out = c.at(4);
        assert!(out.iter().any(
            |a| matches!(a, Action::DropLeg { leg: l, how: LegEnd::HangUpAndRelease } if *l == leg)
        ));
        // The queue frees the agent by the caller.
        assert_eq!(queue_cmds(&out), vec![QueueCommand::Abandon]);
        assert_eq!(ended(&out), Some(End::Served));
    }

    #[test]
    fn only_an_asserted_allowed_number_is_called_back() {
        use crate::call::CallerIdentity::{Asserted, Claimed};
        let c = CallbackConfig::default();
        assert_eq!(
            c.callback_number(&Asserted("+1-212-200-0123".into())),
            Ok(CallbackNumber {
                dial: "+12122000123".into(),
                e164: "+12122000123".into()
            })
        );
        // Dialled as the trunk wrote it; counted and matched as E.164.
        assert_eq!(
            c.callback_number(&Asserted("2122000123".into())),
            Ok(CallbackNumber {
                dial: "2122000123".into(),
                e164: "+12122000123".into()
            })
        );
        assert_eq!(
            c.callback_number(&Claimed("+12122000123".into())),
            Err(Unavailable::Unverified)
        );
        assert_eq!(
            c.callback_number(&Asserted("anonymous".into())),
            Err(Unavailable::NotDialable)
        );
        assert_eq!(
            c.callback_number(&Asserted("+882345678901".into())),
            Err(Unavailable::NotAllowed)
        );
        assert_eq!(
            c.callback_number(&Asserted("+19002000123".into())),
            Err(Unavailable::NotAllowed)
        );
        let mut c = CallbackConfig {
            allowed_numbers: vec!["nanp-geographic".parse().unwrap(), "+44X.".parse().unwrap()],
            refused_numbers: vec!["+1212XXXXXXX".parse().unwrap()],
            ..CallbackConfig::default()
        };
        assert!(c.callback_number(&Asserted("+442079460000".into())).is_ok());
        assert_eq!(
            c.callback_number(&Asserted("+12122000123".into())),
            Err(Unavailable::NotAllowed)
        );
        c.per_number_per_day = 0;
        assert_eq!(
            c.callback_number(&Asserted("+442079460000".into())),
            Err(Unavailable::DailyLimit)
        );
    }
}
