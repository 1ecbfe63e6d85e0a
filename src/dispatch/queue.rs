//! The operator queue: callers who press 0 (or run out of tries) wait here and are offered to
//! operators (agents) fairly.
//!
//! Two layers, as elsewhere in the crate:
//!
//! - [`Dispatcher`] is the sans-IO core. It never reads a clock or touches a socket: every
//!   input carries `now`, and [`Dispatcher::poll`] returns the [`Action`]s to carry out
//!   (ring an agent for a caller, stop ringing, tell a caller their place, offer a ticket after
//!   the longest wait). [`Dispatcher::next_deadline`] says when to poll again.
//! - [`spawn_dispatcher_with_history`] runs one core in a task and hands out [`QueueHandle`]s; each waiting
//!   call registers an `mpsc` sender and receives its [`QueueEvent`]s there.
//!
//! # Routing
//!
//! A queue is served by its `members` (agent ids; a queue that lists none is served by every
//! agent, as Asterisk's dynamic "every member" setups and FreeSWITCH tiers listing all agents
//! would be), and within them skills do the routing. A caller with skill (language) `es` can
//! go to a member whose `skills` contain `es` (case-insensitively) or who has no skills at
//! all; a caller with no skill can go to any member. An agent may be a member of several
//! queues. Callers are served in one global order, higher `priority` first, then earlier
//! arrival (across queues, so no queue starves another). A caller nobody free can take does
//! not block the callers behind it.
//!
//! Every caller the call layer queues today has priority 0: the field orders call-backs and
//! live callers alike, and is there for callers a menu may one day mark as urgent.
//!
//! For each caller the eligible `Available` agents are narrowed to the lowest `tier` present
//! (Asterisk's penalty), then the caller's queue strategy picks:
//!
//! | strategy | picks | Asterisk `app_queue` | FreeSWITCH `mod_callcenter` |
//! | --- | --- | --- | --- |
//! | `longest_idle` | earliest last call end, or login if none since | `leastrecent` (`lastcall`; never-called members first) | `longest-idle-agent` orders by last *offer*, so a missed offer sends the agent to the back; here it does not |
//! | `round_robin` | next after the agent this queue offered last, config order, wrapping | `rrmemory` | `round-robin` |
//! | `fewest_calls` | fewest calls answered since the server started | `fewestcalls` | `agent-with-fewest-calls` (`calls_answered`) |
//! | `ring_all` | every eligible agent of the best tier at once; first answer wins | `ringall` | `ring-all` |
//!
//! Remaining ties go to the agent listed first in the config. One caller rings one agent at a
//! time (all of them for `ring_all`); an agent rings for one caller at a time; agents in
//! wrap-up, paused, in a no-answer pause, on a call or ringing are never offered.
//!
//! # Agent states
//!
//! `LoggedOut → Available` at login (idle since then). An offer makes the agent `Ringing`;
//! answered → `OnCall`; the call's end → `WrapUp` for the queue's `wrap_up_seconds`, then
//! `Available`. Any failed offer (no answer, busy, rejected, unreachable, no common codec) →
//! `NoAnswerPause` for `no_answer_pause_seconds` (Asterisk uses one `retry` for all of these;
//! FreeSWITCH has separate busy/reject/no-answer delays), and the caller keeps its place at
//! the head of the line and is offered to the next agent at once. Losing a ring-all race, or a
//! caller hanging up while the phone rings, costs the agent nothing.
//!
//! `pause` while ringing or on a call takes effect when that ends (Asterisk-style "pause
//! after this call"); `unpause` also ends a no-answer pause early. Pausing does not change
//! how long an agent counts as idle (as in both Asterisk and FreeSWITCH).
//!
//! An operator's own requests from the console ([`Dispatcher::agent_request`]): `Ready`
//! (ends a pause, a no-answer pause or wrap-up), `NotReady` (a pause with a reason),
//! `EndWrapUp`, `ExtendWrapUp` (at most [`MAX_WRAP_UP`] from now), and `SignOff`: logged out
//! while the phone stays registered (after the current call, if there is one). A signed-off agent stays `LoggedOut` through
//! registrations until `Ready` (the core tracks `registered` apart from the status for this).
//! [`Dispatcher::decline`] is the no-answer rule asked for by the operator: `CancelOffer`,
//! then the failed offer's rest. The driver tells consoles of offers (with the
//! [`CallerContext`] the call gave at `enqueue`) and of every agent's state change
//! ([`AgentNotice`], [`QueueHandle::notices`]).
//!
//! If the call never reports an offer's outcome, the core gives up `ring_timeout + 5 s` after
//! the offer: `CancelOffer`, then treated as no answer, so a lost report cannot hold an agent.
//!
//! # Callers
//!
//! [`Dispatcher::enqueue`] refuses at once with [`Refusal::NoAgents`] when no logged-in agent
//! (available, busy or paused) could ever take the caller (Asterisk `joinempty`), and with
//! [`Refusal::QueueFull`] at `max_length` (Asterisk `maxlen`). While waiting, a caller gets
//! `Announce` every `announce_every_seconds` (skipped while an agent's phone rings for it) and
//! one `MaxWait` after `max_wait_seconds` (deferred while ringing). `MaxWait` also comes at once
//! when every agent who could take the caller logs out (Asterisk `leavewhenempty`, FreeSWITCH
//! `max-wait-time-with-no-agent`), so nobody holds for nothing. After `MaxWait` the caller
//! stays queued (and can still be offered) until the call says [`Dispatcher::abandon`].
//!
//! A queue the menu names but the config does not list behaves as a default [`QueueConfig`]
//! with that name. For `max_length`, `max_wait_seconds` and `announce_every_seconds`, 0 means
//! "no limit"/"never" (Asterisk's convention); `ring_timeout_seconds` is at least 1.
//!
//! # Estimated wait (EWT)
//!
//! `AHT = mean talk time of the queue's last 20 answered-and-ended calls + wrap_up_seconds`
//! (180 s until the queue has ended a call). With `staffed` = logged-in agents who can take
//! the caller and are not paused (available, ringing, on a call, in wrap-up or a no-answer
//! pause) and `free` = those of them available right now:
//!
//! `EWT = AHT × ceil(max(0, place − free) / max(1, staffed))`
//!
//! so a caller an idle agent can take at once is told 0, and each "round" of `staffed`
//! callers ahead costs one handle time. (Asterisk announces a smoothed average hold time not
//! scaled by position; FreeSWITCH announces nothing.)
//!
//! # Service level
//!
//! `service_level = answered_within_30s / (answered + abandoned)`, where `abandoned` counts
//! every caller who left the queue unanswered, whatever the wait (also after `MaxWait`).
//! Refused callers never entered and are not counted. `None` until a caller has left the
//! queue. This is stricter than Asterisk's `QUEUESRVLEVELPERF` (answered-in-SL / answered,
//! abandons ignored) and its SL2 ((answered-in-SL + abandoned-in-SL) / (answered +
//! abandoned), quick abandons forgiven); `abandoned_within_30s` is reported so SL2 can be
//! derived. Counters run from server start.
//!
//! # Call-backs that keep the caller's place
//!
//! A waiting caller can ask to be called back ([`Dispatcher::request_callback`]): they hang
//! up, and their entry stays in the line with its arrival and priority (it counts in
//! `waiting`, `longest_wait` and everyone's `place`), in one of three phases:
//!
//! - *parked*: not on the line. When it comes up (it is the first entry, in the usual order,
//!   for which an eligible agent is `Available`, and its retry time has passed) the core asks
//!   for [`Action::DialBack`] and the entry goes *dialing*. A parked entry is never offered
//!   to an agent, gets no `Announce` and no `MaxWait`.
//! - *dialing*: the caller's phone rings. One free agent who can take the caller is *held
//!   back* from the callers behind it (not rung, still shown `available`; callers ahead of it,
//!   e.g. a higher priority, may still take that agent), so nobody who came later overtakes
//!   the caller while their phone rings, and one free agent never has two call-backs dialled
//!   for it. [`Dispatcher::callback_answered`] makes the entry
//!   *answered*; [`Dispatcher::callback_failed`] (or no report within the dial's ring
//!   timeout plus 5 s) parks it again for `retry_after`, until `attempts` dials have failed: then the
//!   entry leaves the line with [`Action::CallbackUnreached`] (the driver files a ticket
//!   flagged for call-back, so nobody is lost) and counts as abandoned.
//! - *answered*: the caller is on the line again and the entry is an ordinary waiting caller
//!   at its old place (usually the head), offered to agents as any other, with the usual
//!   no-answer and next-agent rules. `max_wait_seconds` restarts at the answer (and `MaxWait`
//!   comes at once if nobody who could take it is logged in), so a called-back caller is
//!   not held for nothing either. No announcements: their place is first or close to it.
//!
//! Commercial "virtual hold" products come in two orders. *Customer-first* (Cisco's
//! Courtesy Callback, Genesys "customer first") dials the caller when their estimated turn
//! comes and re-queues them at the head once they answer, leaving agents busy with others
//! meanwhile: no agent time lost, but the free agent goes to someone who arrived later and
//! the answered caller waits again. *Agent-first*/preview rings an agent first and dials the
//! caller from the agent's call: the caller never waits, but every unanswered dial (30 s of
//! ringing, voicemail, retries) burns agent time. We take the middle: dial the caller first
//! (customer-first, so an agent's phone never rings for a caller who may not answer) but
//! only when an agent is free for them, and hold that agent back from later callers for at
//! most the dial's ring timeout (+5 s if the outcome is never reported). The caller keeps
//! their place for real, and the price is bounded agent idle time per dial. Asterisk's
//! `app_queue` and FreeSWITCH's `mod_callcenter` have no built-in call-back; both leave it to
//! dial plans and call files.
//!
//! `figures()` and `agents()` take no clock: durations in them are as of the latest `now`
//! the dispatcher was given (the driver polls just before answering).

use crate::config::{AgentConfig, QueueConfig, Strategy};
use crate::dispatch::cluster::{ClaimReply, ClusterCmd};
use crate::history::{AgentStateRecord, History, QueueEventKind, QueueEventRecord, Record};
use serde::{Serialize, Serializer};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Identifies one waiting call (chosen by the call layer, unique while the call lives).
pub(crate) type CallerId = u64;

/// Answered within this counts toward the service level.
pub(crate) const SERVICE_LEVEL_TARGET: Duration = Duration::from_secs(30);
/// How many recent calls the average handle time is taken over.
const AHT_SAMPLES: usize = 20;
/// Average handle time before the queue has ended a call.
const DEFAULT_AHT: Duration = Duration::from_secs(180);
/// An offer with no reported outcome is withdrawn this long after its ring timeout.
const OFFER_GRACE: Duration = Duration::from_secs(5);
/// Settings are capped at a year so `Instant` arithmetic cannot overflow.
const MAX_SETTING_SECS: u64 = 365 * 86_400;

/// What an agent is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AgentStatus {
    LoggedOut,
    Available,
    Ringing { caller: CallerId },
    OnCall { caller: CallerId },
    WrapUp { until: Instant },
    NoAnswerPause { until: Instant },
    Paused { reason: String },
}

impl AgentStatus {
    /// `snake_case` name, as in the admin JSON.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            AgentStatus::LoggedOut => "logged_out",
            AgentStatus::Available => "available",
            AgentStatus::Ringing { .. } => "ringing",
            AgentStatus::OnCall { .. } => "on_call",
            AgentStatus::WrapUp { .. } => "wrap_up",
            AgentStatus::NoAnswerPause { .. } => "no_answer_pause",
            AgentStatus::Paused { .. } => "paused",
        }
    }
}

/// A caller's place in its queue and the estimated wait (see the module docs for EWT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Position {
    /// 1-based place among the callers waiting in the same queue.
    pub(crate) place: usize,
    #[serde(rename = "ewt_seconds", serialize_with = "whole_seconds")]
    pub(crate) ewt: Duration,
}

/// A caller waiting on this node, as the other nodes of a cluster see it
/// ([`Dispatcher::line`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LineEntry {
    pub(crate) caller: CallerId,
    pub(crate) queue: String,
    pub(crate) skill: Option<String>,
    pub(crate) priority: i32,
    /// When the caller joined the line.
    pub(crate) since: Instant,
}

/// Which callers one agent can take: its skills and whether each queue the core knows is
/// served by it. A queue not listed is served by every agent (a default queue), as in the
/// core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Takes {
    pub(crate) skills: Vec<String>,
    pub(crate) queues: Vec<(String, bool)>,
}

impl Takes {
    /// Whether the agent could take a caller of `queue` needing `skill`, by the core's rules.
    pub(crate) fn could_take(&self, queue: &str, skill: Option<&str>) -> bool {
        let serves = self
            .queues
            .iter()
            .find(|(name, _)| name == queue)
            .is_none_or(|(_, serves)| *serves);
        serves && has_skill(&self.skills, skill)
    }
}

/// An agent with `skills` can take a caller needing `skill`: any caller when it lists none,
/// or the skill listed (case-insensitively).
fn has_skill(skills: &[String], skill: Option<&str>) -> bool {
    match skill {
        None => true,
        Some(s) => skills.is_empty() || skills.iter().any(|k| k.eq_ignore_ascii_case(s)),
    }
}

/// How call-backs are dialled (from the `callback` config section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallbackPolicy {
    /// How long the caller's phone may ring per attempt.
    pub(crate) ring_timeout: Duration,
    /// Dials before the entry gives up (at least 1).
    pub(crate) attempts: u32,
    /// Wait after a failed dial before the entry may be dialled again.
    pub(crate) retry_after: Duration,
    /// The earliest first dial after the request.
    pub(crate) first_delay: Duration,
}

impl Default for CallbackPolicy {
    fn default() -> Self {
        Self::from(&crate::config::CallbackConfig::default())
    }
}

impl From<&crate::config::CallbackConfig> for CallbackPolicy {
    fn from(c: &crate::config::CallbackConfig) -> Self {
        CallbackPolicy {
            ring_timeout: setting(c.ring_timeout_seconds.max(1)),
            attempts: c.attempts.max(1),
            retry_after: setting(c.retry_after_seconds),
            first_delay: setting(c.first_delay_seconds),
        }
    }
}

/// Why a caller was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// No logged-in agent could ever take this caller (skill): say so now, never hold.
    #[error("no operator who can take this call is logged in")]
    NoAgents,
    /// The queue already holds `max_length` callers.
    #[error("the queue is full")]
    QueueFull,
}

/// Why an offer to an agent failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OfferFailure {
    /// Rang for the whole ring timeout.
    NoAnswer,
    Busy,
    Rejected,
    Unreachable,
    NoCommonCodec,
}

impl OfferFailure {
    /// What an operator phone's final answer to our INVITE means for the queue.
    pub(crate) fn from_status(code: u16) -> OfferFailure {
        match code {
            486 | 600 => OfferFailure::Busy,
            603 | 403 => OfferFailure::Rejected,
            488 | 606 => OfferFailure::NoCommonCodec,
            408 | 480 | 487 => OfferFailure::NoAnswer,
            _ => OfferFailure::Unreachable,
        }
    }
}

/// The longest wrap-up an operator can extend theirs to, from now.
pub const MAX_WRAP_UP: Duration = Duration::from_secs(3600);

/// What an operator asks for from the console ([`Dispatcher::agent_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRequest {
    /// Take calls: ends a pause, a no-answer pause or wrap-up, cancels a pause asked for
    /// during a call, and undoes `SignOff` (available once the phone is registered).
    Ready,
    /// Stop taking calls for `reason` (a pause; after the current call if there is one).
    NotReady { reason: String },
    /// Log out of the queues while the phone stays registered, until `Ready`. A ringing
    /// offer is withdrawn at no cost; on a call, it takes effect when the call ends.
    SignOff,
    /// End wrap-up now.
    EndWrapUp,
    /// Add this much to wrap-up (at most [`MAX_WRAP_UP`] from now in all).
    ExtendWrapUp(Duration),
}

/// Why an operator's request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestRefusal {
    #[error("no such agent")]
    UnknownAgent,
    /// Not ready needs a logged-in phone (nothing to pause otherwise).
    #[error("the agent's phone is not registered")]
    NotRegistered,
    #[error("the agent is not in wrap-up")]
    NotInWrapUp,
}

/// What the core asks the outside to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Ring `agent` for `caller` (INVITE), then report `offer_answered` or `offer_failed`.
    Offer {
        caller: CallerId,
        agent: String,
        ring_timeout: Duration,
    },
    /// Stop ringing `agent` for `caller` (another agent took it, the caller left, the agent
    /// logged out, or the outcome was never reported).
    CancelOffer { caller: CallerId, agent: String },
    /// Tell a waiting caller their place and estimated wait.
    Announce {
        caller: CallerId,
        position: Position,
    },
    /// The caller waited `max_wait_seconds` (or nobody who could take it is logged in any
    /// more): offer a ticket or a call-back. It stays queued until `abandon`.
    MaxWait { caller: CallerId },
    /// A call-back's turn came: ring the caller's phone (dial number `attempt`, from 1) for
    /// up to `ring_timeout`, then report `callback_answered` or `callback_failed`.
    DialBack {
        caller: CallerId,
        attempt: u32,
        ring_timeout: Duration,
    },
    /// Every dial of a call-back failed: the entry has left the line; file a ticket flagged
    /// for call-back instead.
    CallbackUnreached { caller: CallerId },
}

impl Action {
    /// The caller this action concerns.
    pub(crate) fn caller(&self) -> CallerId {
        match self {
            Action::Offer { caller, .. }
            | Action::CancelOffer { caller, .. }
            | Action::Announce { caller, .. }
            | Action::MaxWait { caller }
            | Action::DialBack { caller, .. }
            | Action::CallbackUnreached { caller } => *caller,
        }
    }
}

/// Agents of a queue by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct AgentCounts {
    pub(crate) logged_out: usize,
    pub(crate) available: usize,
    pub(crate) ringing: usize,
    pub(crate) on_call: usize,
    pub(crate) wrap_up: usize,
    pub(crate) no_answer_pause: usize,
    pub(crate) paused: usize,
}

/// One queue's live figures and counters (since server start).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct QueueFigures {
    pub(crate) name: String,
    pub(crate) strategy: &'static str,
    /// Callers waiting now (including those an agent's phone is ringing for).
    pub(crate) waiting: usize,
    #[serde(rename = "longest_wait_seconds", serialize_with = "whole_seconds")]
    pub(crate) longest_wait: Duration,
    /// All agents (every agent serves every queue), by status.
    pub(crate) agents: AgentCounts,
    pub(crate) answered: u64,
    /// Left unanswered (hung up, or left after `MaxWait`).
    pub(crate) abandoned: u64,
    pub(crate) answered_within_30s: u64,
    pub(crate) abandoned_within_30s: u64,
    /// `MaxWait` actions issued.
    pub(crate) max_wait_reached: u64,
    /// Refused at `enqueue` (no agents, queue full).
    pub(crate) refused: u64,
    /// `answered_within_30s / (answered + abandoned)`; `None` before anyone left the queue.
    pub(crate) service_level: Option<f64>,
    #[serde(rename = "average_handle_seconds", serialize_with = "whole_seconds")]
    pub(crate) average_handle_time: Duration,
    /// Estimated wait for a caller (no skill) joining now.
    #[serde(rename = "ewt_seconds", serialize_with = "whole_seconds")]
    pub(crate) ewt: Duration,
    /// Of `waiting`: call-backs keeping their place (parked, dialling, or answered and
    /// waiting for an agent).
    pub(crate) callbacks_pending: usize,
    /// Call-backs asked for since start.
    pub(crate) callbacks_requested: u64,
    /// Call-backs given up after every dial failed (filed as flagged tickets; also counted in
    /// `abandoned`).
    pub(crate) callbacks_unreached: u64,
}

/// One agent, for the admin view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct AgentView {
    pub(crate) id: String,
    pub(crate) name: Option<String>,
    #[serde(skip)]
    pub(crate) status: AgentStatus,
    /// `status` as a `snake_case` word.
    pub(crate) state: &'static str,
    /// The caller ringing or connected.
    pub(crate) caller: Option<CallerId>,
    /// Why paused, or the reason of a pause that starts when the current call ends.
    pub(crate) pause_reason: Option<String>,
    /// Seconds left of wrap-up or no-answer pause.
    pub(crate) seconds_left: Option<u64>,
    pub(crate) calls_taken: u64,
    /// Last call end or login (`None` while logged out).
    #[serde(skip)]
    pub(crate) idle_since: Option<Instant>,
    /// Seconds since `idle_since`, while available.
    pub(crate) idle_seconds: Option<u64>,
    pub(crate) skills: Vec<String>,
    pub(crate) tier: u32,
    /// The agent's phone (or console audio) is registered.
    pub(crate) registered: bool,
    /// Signed off at the console (logged out while the phone stays registered).
    pub(crate) signed_off: bool,
    /// Another node of the cluster has the agent (ringing, on a call, wrapping up or paused
    /// there): this node does not offer it calls.
    pub(crate) busy_elsewhere: bool,
    /// Seconds in the current state (`state` and `pause_reason`), as the history records
    /// the spans; `None` before the first log-in.
    pub(crate) state_seconds: Option<u64>,
    /// The queue of the call the agent is on.
    pub(crate) queue: Option<String>,
}

/// One caller waiting in a queue, for the wallboard. No personal data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct WaitingView {
    pub(crate) caller: CallerId,
    pub(crate) queue: String,
    pub(crate) waited_seconds: u64,
    /// A call-back keeping its place (parked, dialling, or answered and waiting).
    pub(crate) callback: bool,
    /// The agent whose phone rings for the caller.
    pub(crate) ringing: Option<String>,
}

fn whole_seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs() + u64::from(d.subsec_millis() >= 500))
}

fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::LongestIdle => "longest_idle",
        Strategy::RoundRobin => "round_robin",
        Strategy::FewestCalls => "fewest_calls",
        Strategy::RingAll => "ring_all",
    }
}

fn setting(secs: u64) -> Duration {
    Duration::from_secs(secs.min(MAX_SETTING_SECS))
}

/// `now + d`, saturating at `now` in the (capped, so impossible) overflow case.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or(now)
}

struct Agent {
    id: String,
    name: Option<String>,
    skills: Vec<String>,
    tier: u32,
    status: AgentStatus,
    idle_since: Option<Instant>,
    calls_taken: u64,
    /// While ringing: when the core gives up on hearing the outcome.
    offer_expires: Option<Instant>,
    /// While on a call.
    call: Option<Connected>,
    /// Pause requested while ringing or on a call.
    pause_after: Option<String>,
    /// The state the journal last saw, with its reason and since when (`None` before the
    /// first log-in).
    journaled: Option<(&'static str, Option<String>, Instant)>,
    /// The agent's phone (or console audio) is registered.
    registered: bool,
    /// The operator signed off at the console: logged out while registered, until they ask
    /// to be ready again.
    signed_off: bool,
    /// Another node of the cluster holds the agent (ringing, on a call, wrapping up or
    /// paused there): not offered here ([`Dispatcher::set_held_elsewhere`]).
    held_elsewhere: bool,
    /// This node's claim on the agent was refused: not offered here before this instant
    /// ([`Dispatcher::claim_refused`]).
    not_before: Option<Instant>,
}

struct Connected {
    queue: usize,
    answered_at: Instant,
}

impl Agent {
    fn can_take(&self, skill: Option<&str>) -> bool {
        has_skill(&self.skills, skill)
    }

    fn logged_in(&self) -> bool {
        self.status != AgentStatus::LoggedOut
    }

    /// Available here and not held by another node.
    fn offerable(&self, now: Instant) -> bool {
        self.status == AgentStatus::Available
            && !self.held_elsewhere
            && self.not_before.is_none_or(|t| t <= now)
    }

    fn ringing_for(&self, caller: CallerId) -> bool {
        self.status == AgentStatus::Ringing { caller }
    }

    /// Stop ringing without penalty.
    fn release(&mut self) {
        self.offer_expires = None;
        self.status = match self.pause_after.take() {
            Some(reason) => AgentStatus::Paused { reason },
            None => AgentStatus::Available,
        };
    }
}

struct QueueState {
    name: String,
    /// The agents (ids) who take this queue's callers; `None`: every agent.
    members: Option<HashSet<String>>,
    strategy: Strategy,
    wrap_up: Duration,
    ring_timeout: Duration,
    no_answer_pause: Duration,
    max_wait: Option<Duration>,
    max_length: Option<usize>,
    announce_every: Option<Duration>,
    /// Round robin: the agent this queue offered last.
    rr_last: Option<usize>,
    talk_times: VecDeque<Duration>,
    answered: u64,
    abandoned: u64,
    answered_in_sl: u64,
    abandoned_in_sl: u64,
    max_wait_reached: u64,
    refused: u64,
    callbacks_requested: u64,
    callbacks_unreached: u64,
}

impl QueueState {
    fn new(c: &QueueConfig) -> Self {
        let positive = |secs: u64| (secs > 0).then(|| setting(secs));
        QueueState {
            name: c.name.clone(),
            members: c.members.as_ref().map(|m| m.iter().cloned().collect()),
            strategy: c.strategy,
            wrap_up: setting(c.wrap_up_seconds),
            ring_timeout: setting(c.ring_timeout_seconds.max(1)),
            no_answer_pause: setting(c.no_answer_pause_seconds),
            max_wait: positive(c.max_wait_seconds),
            max_length: (c.max_length > 0).then_some(c.max_length),
            announce_every: positive(c.announce_every_seconds),
            rr_last: None,
            talk_times: VecDeque::with_capacity(AHT_SAMPLES),
            answered: 0,
            abandoned: 0,
            answered_in_sl: 0,
            abandoned_in_sl: 0,
            max_wait_reached: 0,
            refused: 0,
            callbacks_requested: 0,
            callbacks_unreached: 0,
        }
    }

    /// Whether `agent` takes this queue's callers.
    fn serves(&self, agent: &Agent) -> bool {
        self.members.as_ref().is_none_or(|m| m.contains(&agent.id))
    }

    fn aht(&self) -> Duration {
        let n = self.talk_times.len();
        if n == 0 {
            return DEFAULT_AHT;
        }
        let total: Duration = self.talk_times.iter().sum();
        total / u32::try_from(n).unwrap_or(1) + self.wrap_up
    }
}

struct Waiting {
    caller: CallerId,
    queue: usize,
    skill: Option<String>,
    priority: i32,
    since: Instant,
    next_announce: Option<Instant>,
    max_wait_at: Option<Instant>,
    max_wait_sent: bool,
    /// Set once the caller asked for a call-back that keeps this place.
    callback: Option<Callback>,
}

/// A call-back entry's phase (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallbackPhase {
    /// Not on the line; dial once it comes up, not before `not_before`.
    Parked { not_before: Instant },
    /// The caller's phone rings; given up as failed at `expires` if nothing is reported.
    Dialing { expires: Instant },
    /// The caller is on the line again: an ordinary waiting entry.
    Answered,
}

#[derive(Debug, Clone, Copy)]
struct Callback {
    phase: CallbackPhase,
    /// Dials made so far.
    attempts: u32,
}

impl Waiting {
    /// On the line (not a parked or dialling call-back): may be offered to agents.
    fn offerable(&self) -> bool {
        self.callback
            .is_none_or(|c| c.phase == CallbackPhase::Answered)
    }
}

/// The sans-IO queue core. See the module docs.
pub(crate) struct Dispatcher {
    agents: Vec<Agent>,
    queues: Vec<QueueState>,
    /// Sorted: higher priority first, then arrival (new callers go after their equals).
    waiting: Vec<Waiting>,
    outbox: Vec<Action>,
    /// What happened, for the call history ([`Dispatcher::take_journal`]).
    journal: Vec<Journal>,
    /// The latest `now` seen.
    now: Option<Instant>,
    callback_policy: CallbackPolicy,
    /// Callers talking to an agent, with the place they had in line: one whose operator is
    /// lost goes back there ([`Dispatcher::requeue`]).
    connected: HashMap<CallerId, Place>,
}

/// Where an answered caller stood in line.
#[derive(Debug, Clone)]
struct Place {
    queue: usize,
    skill: Option<String>,
    priority: i32,
    since: Instant,
}

/// What the queue records for the call history (see [`crate::history`]): queue events as
/// Asterisk's `queue_log` has them, and the spans of time operators spent in each state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Journal {
    Queue {
        at: Instant,
        queue: String,
        caller: CallerId,
        agent: Option<String>,
        event: QueueEventKind,
        /// `Answer`, `Abandon`: the caller's wait.
        wait: Option<Duration>,
        /// `Complete`: the talk time.
        talk: Option<Duration>,
        /// `Enter`: the place taken.
        position: Option<usize>,
    },
    AgentState {
        agent: String,
        state: &'static str,
        reason: Option<String>,
        from: Instant,
        to: Instant,
    },
}

impl Dispatcher {
    /// Agents start logged out. Duplicate agent ids or queue names: the first wins.
    pub(crate) fn new(agents: &[AgentConfig], queues: &[QueueConfig]) -> Self {
        let mut d = Dispatcher {
            agents: Vec::with_capacity(agents.len()),
            queues: Vec::with_capacity(queues.len()),
            waiting: Vec::new(),
            outbox: Vec::new(),
            journal: Vec::new(),
            now: None,
            callback_policy: CallbackPolicy::default(),
            connected: HashMap::new(),
        };
        for a in agents {
            if d.agent_idx(&a.id).is_some() {
                continue;
            }
            d.agents.push(Agent {
                id: a.id.clone(),
                name: a.name.clone(),
                skills: a.skills.clone(),
                tier: a.tier,
                status: AgentStatus::LoggedOut,
                idle_since: None,
                calls_taken: 0,
                offer_expires: None,
                call: None,
                pause_after: None,
                journaled: None,
                registered: false,
                signed_off: false,
                held_elsewhere: false,
                not_before: None,
            });
        }
        for q in queues {
            if d.queue_idx(&q.name).is_none() {
                d.queues.push(QueueState::new(q));
            }
        }
        d
    }

    /// How call-backs are dialled (default: [`CallbackPolicy::default`]).
    pub(crate) fn with_callback_policy(mut self, policy: CallbackPolicy) -> Self {
        self.callback_policy = CallbackPolicy {
            attempts: policy.attempts.max(1),
            ring_timeout: policy.ring_timeout.max(Duration::from_secs(1)),
            ..policy
        };
        self
    }

    /// The agent's phone registered: `LoggedOut → Available`, idle since `now`, unless the
    /// operator signed off at the console ([`AgentRequest::SignOff`]). Other states (and
    /// unknown ids) unchanged.
    pub(crate) fn agent_logged_in(&mut self, now: Instant, agent: &str) {
        self.touch(now);
        if let Some(a) = self.agent_mut(agent) {
            a.registered = true;
            if a.status == AgentStatus::LoggedOut && !a.signed_off {
                a.status = AgentStatus::Available;
                a.idle_since = Some(now);
            }
        }
    }

    /// Any state → `LoggedOut`. A ringing offer is withdrawn (`CancelOffer`; the caller keeps
    /// its place). A call in progress is forgotten (it is not counted in the handle time).
    pub(crate) fn agent_logged_out(&mut self, now: Instant, agent: &str) {
        self.touch(now);
        let Some(i) = self.agent_idx(agent) else {
            return;
        };
        let Some(a) = self.agents.get_mut(i) else {
            return;
        };
        if let AgentStatus::Ringing { caller } = a.status {
            self.outbox.push(Action::CancelOffer {
                caller,
                agent: a.id.clone(),
            });
        }
        a.registered = false;
        a.status = AgentStatus::LoggedOut;
        a.idle_since = None;
        a.offer_expires = None;
        a.call = None;
        a.pause_after = None;
    }

    /// Stop offering calls to `agent`. While ringing or on a call the pause starts when that
    /// ends. `false` for an unknown or logged-out agent.
    pub(crate) fn pause(&mut self, agent: &str, reason: &str) -> bool {
        let Some(a) = self.agent_mut(agent) else {
            return false;
        };
        match a.status {
            AgentStatus::LoggedOut => false,
            AgentStatus::Ringing { .. } | AgentStatus::OnCall { .. } => {
                a.pause_after = Some(reason.to_owned());
                true
            }
            _ => {
                a.status = AgentStatus::Paused {
                    reason: reason.to_owned(),
                };
                true
            }
        }
    }

    /// `Paused` or `NoAnswerPause` → `Available`, or cancel a pending pause. `false` if there
    /// was nothing to undo.
    pub(crate) fn unpause(&mut self, now: Instant, agent: &str) -> bool {
        self.touch(now);
        let Some(a) = self.agent_mut(agent) else {
            return false;
        };
        match a.status {
            AgentStatus::Paused { .. } | AgentStatus::NoAnswerPause { .. } => {
                a.status = AgentStatus::Available;
                true
            }
            AgentStatus::Ringing { .. } | AgentStatus::OnCall { .. } => {
                a.pause_after.take().is_some()
            }
            _ => false,
        }
    }

    /// An operator's own request from the console (see [`AgentRequest`]).
    pub fn agent_request(
        &mut self,
        now: Instant,
        agent: &str,
        req: AgentRequest,
    ) -> Result<(), RequestRefusal> {
        self.touch(now);
        let Some(i) = self.agent_idx(agent) else {
            return Err(RequestRefusal::UnknownAgent);
        };
        let Some(a) = self.agents.get_mut(i) else {
            return Err(RequestRefusal::UnknownAgent);
        };
        match req {
            AgentRequest::Ready => {
                a.signed_off = false;
                match a.status {
                    AgentStatus::LoggedOut if a.registered => {
                        a.status = AgentStatus::Available;
                        a.idle_since = Some(now);
                    }
                    // Available as soon as the phone registers.
                    AgentStatus::LoggedOut => {}
                    AgentStatus::Paused { .. }
                    | AgentStatus::NoAnswerPause { .. }
                    | AgentStatus::WrapUp { .. } => a.status = AgentStatus::Available,
                    AgentStatus::Ringing { .. } | AgentStatus::OnCall { .. } => {
                        a.pause_after = None;
                    }
                    AgentStatus::Available => {}
                }
                Ok(())
            }
            AgentRequest::NotReady { reason } => match a.status {
                AgentStatus::LoggedOut if !a.registered => Err(RequestRefusal::NotRegistered),
                AgentStatus::LoggedOut => {
                    a.signed_off = false;
                    a.idle_since = Some(now);
                    a.status = AgentStatus::Paused { reason };
                    Ok(())
                }
                AgentStatus::Ringing { .. } | AgentStatus::OnCall { .. } => {
                    a.pause_after = Some(reason);
                    Ok(())
                }
                _ => {
                    a.status = AgentStatus::Paused { reason };
                    Ok(())
                }
            },
            AgentRequest::SignOff => {
                a.signed_off = true;
                a.pause_after = None;
                match a.status {
                    // Logged out when the call ends.
                    AgentStatus::OnCall { .. } => return Ok(()),
                    AgentStatus::Ringing { caller } => {
                        self.outbox.push(Action::CancelOffer {
                            caller,
                            agent: a.id.clone(),
                        });
                    }
                    _ => {}
                }
                a.status = AgentStatus::LoggedOut;
                a.idle_since = None;
                a.offer_expires = None;
                Ok(())
            }
            AgentRequest::EndWrapUp => match a.status {
                AgentStatus::WrapUp { .. } => {
                    a.status = AgentStatus::Available;
                    Ok(())
                }
                _ => Err(RequestRefusal::NotInWrapUp),
            },
            AgentRequest::ExtendWrapUp(by) => match a.status {
                AgentStatus::WrapUp { until } => {
                    let most = later(now, MAX_WRAP_UP);
                    a.status = AgentStatus::WrapUp {
                        until: later(until, by.min(MAX_WRAP_UP)).min(most),
                    };
                    Ok(())
                }
                _ => Err(RequestRefusal::NotInWrapUp),
            },
        }
    }

    /// The operator declined the offer ringing for `caller` (from the console): the offer is
    /// withdrawn (`CancelOffer`, so the call stops ringing the phone) and counts as not
    /// answered: the agent rests for `no_answer_pause_seconds` and the caller is offered to
    /// the next agent. `false` unless that agent is ringing for that caller.
    pub fn decline(&mut self, now: Instant, caller: CallerId, agent: &str) -> bool {
        self.touch(now);
        let Some(i) = self.agent_idx(agent) else {
            return false;
        };
        if !self.agents.get(i).is_some_and(|a| a.ringing_for(caller)) {
            return false;
        }
        debug!(caller, agent, "operator declined the offer");
        self.outbox.push(Action::CancelOffer {
            caller,
            agent: agent.to_owned(),
        });
        self.fail_offer(now, i, caller);
        true
    }

    /// Where a waiting `caller` is: its queue's name, since when it waits, and whether it is
    /// a call-back. `None` if it is not waiting.
    pub fn waiting_info(&self, caller: CallerId) -> Option<(String, Instant, bool)> {
        let w = self.waiting.get(self.waiting_idx(caller)?)?;
        let q = self.queues.get(w.queue)?;
        Some((q.name.clone(), w.since, w.callback.is_some()))
    }

    /// Queue a caller. Returns its position at once (no `Announce` for it); offers follow from
    /// the next `poll`. A caller already waiting gets its current position back.
    pub(crate) fn enqueue(
        &mut self,
        now: Instant,
        caller: CallerId,
        queue: &str,
        skill: Option<&str>,
        priority: i32,
    ) -> Result<Position, Refusal> {
        self.insert(now, caller, queue, skill, Some(priority), now)
    }

    /// Queue a caller an operator sent on (a transfer to this queue, or one that failed after
    /// the operator left) at the front of the line, ahead of every caller waiting whatever
    /// their priority, with its wait counted from `since` (when it first joined a queue):
    /// the caller already waited their turn. Refused as [`Dispatcher::enqueue`] is.
    pub fn rejoin(
        &mut self,
        now: Instant,
        caller: CallerId,
        queue: &str,
        skill: Option<&str>,
        since: Instant,
    ) -> Result<Position, Refusal> {
        self.insert(now, caller, queue, skill, None, since.min(now))
    }

    /// [`Dispatcher::enqueue`] (`priority`: in priority order) or [`Dispatcher::rejoin`]
    /// (`None`: first).
    fn insert(
        &mut self,
        now: Instant,
        caller: CallerId,
        queue: &str,
        skill: Option<&str>,
        priority: Option<i32>,
        since: Instant,
    ) -> Result<Position, Refusal> {
        self.touch(now);
        if let Some(p) = self.position(caller) {
            return Ok(p);
        }
        let q = self.queue_or_default(queue);
        let refuse = if !self
            .agents
            .iter()
            .any(|a| a.logged_in() && self.takes(q, a, skill))
        {
            Some(Refusal::NoAgents)
        } else {
            let here = self.waiting.iter().filter(|w| w.queue == q).count();
            self.queues
                .get(q)
                .and_then(|qs| qs.max_length)
                .filter(|max| here >= *max)
                .map(|_| Refusal::QueueFull)
        };
        let Some(qs) = self.queues.get_mut(q) else {
            return Err(Refusal::NoAgents);
        };
        if let Some(r) = refuse {
            qs.refused += 1;
            return Err(r);
        }
        // At the front: as high a priority as the first caller's, so the line stays sorted.
        let (priority, front) = match priority {
            Some(p) => (p, false),
            None => (self.waiting.first().map_or(0, |w| w.priority.max(0)), true),
        };
        let w = Waiting {
            caller,
            queue: q,
            skill: skill.map(str::to_owned),
            priority,
            since,
            next_announce: qs.announce_every.map(|e| later(now, e)),
            max_wait_at: qs.max_wait.map(|m| later(now, m)),
            max_wait_sent: false,
            callback: None,
        };
        // After every caller of the same or higher priority (all arrived earlier).
        let at = if front {
            0
        } else {
            self.waiting.partition_point(|x| x.priority >= priority)
        };
        self.waiting.insert(at, w);
        let position = self.position_at(at);
        self.log(now, q, caller, None, QueueEventKind::Enter, |e| {
            if let Journal::Queue { position: p, .. } = e {
                *p = Some(position.place);
            }
        });
        Ok(position)
    }

    /// Ring `agent` for `caller` outside the queues (an operator transfers the caller to
    /// them): `Available → Ringing`, given up as no answer `ring_timeout` + 5 s on if the
    /// outcome never comes. The call reports [`Dispatcher::direct_answered`], or
    /// [`Dispatcher::withdraw_offer`] when the phone did not take it (no penalty: the agent
    /// was not offered a queue's caller). `Err` with the agent's state word when it cannot
    /// take a call now (on a call, paused, logged out...).
    pub fn ring_direct(
        &mut self,
        now: Instant,
        caller: CallerId,
        agent: &str,
        ring_timeout: Duration,
    ) -> Result<(), &'static str> {
        self.touch(now);
        let Some(a) = self.agent_mut(agent) else {
            return Err("unknown");
        };
        if a.status != AgentStatus::Available {
            return Err(a.status.as_str());
        }
        if a.held_elsewhere {
            return Err("busy_elsewhere");
        }
        a.status = AgentStatus::Ringing { caller };
        a.offer_expires = Some(later(now, ring_timeout + OFFER_GRACE));
        Ok(())
    }

    /// `agent`, rung by [`Dispatcher::ring_direct`], answered: it goes `OnCall` with `caller`
    /// (counted in its calls taken, not in any queue's figures). Ignored unless that agent is
    /// ringing for that caller.
    pub fn direct_answered(&mut self, now: Instant, caller: CallerId, agent: &str) {
        self.touch(now);
        if let Some(a) = self.agent_mut(agent) {
            if a.ringing_for(caller) {
                a.status = AgentStatus::OnCall { caller };
                a.offer_expires = None;
                a.calls_taken += 1;
                a.call = None;
            }
        }
    }

    /// The caller hung up or left. Waiting (or ringing): removed, counted as abandoned, any
    /// ringing agents get `CancelOffer`. Connected to an agent: that agent's call ended.
    pub(crate) fn abandon(&mut self, now: Instant, caller: CallerId) {
        self.touch(now);
        self.connected.remove(&caller);
        if let Some(wi) = self.waiting_idx(caller) {
            let w = self.waiting.remove(wi);
            self.cancel_offers(caller, None);
            let wait = now.saturating_duration_since(w.since);
            self.log(now, w.queue, caller, None, QueueEventKind::Abandon, |e| {
                if let Journal::Queue { wait: x, .. } = e {
                    *x = Some(wait);
                }
            });
            if let Some(qs) = self.queues.get_mut(w.queue) {
                qs.abandoned += 1;
                if now.saturating_duration_since(w.since) <= SERVICE_LEVEL_TARGET {
                    qs.abandoned_in_sl += 1;
                }
            }
        } else if let Some(i) = self
            .agents
            .iter()
            .position(|a| a.status == AgentStatus::OnCall { caller })
        {
            self.end_call(now, i);
        }
    }

    /// `agent` answered for `caller`: it goes `OnCall`, the caller leaves the queue, other
    /// agents ringing for it (ring-all) get `CancelOffer`. Ignored unless that agent is
    /// ringing for that caller.
    pub(crate) fn offer_answered(&mut self, now: Instant, caller: CallerId, agent: &str) {
        self.touch(now);
        let Some(i) = self.agent_idx(agent) else {
            return;
        };
        if !self.agents.get(i).is_some_and(|a| a.ringing_for(caller)) {
            return;
        }
        let Some(wi) = self.waiting_idx(caller) else {
            if let Some(a) = self.agents.get_mut(i) {
                a.release();
            }
            return;
        };
        let w = self.waiting.remove(wi);
        self.connected.insert(
            caller,
            Place {
                queue: w.queue,
                skill: w.skill.clone(),
                priority: w.priority,
                since: w.since,
            },
        );
        self.cancel_offers(caller, Some(i));
        let wait = now.saturating_duration_since(w.since);
        self.log(
            now,
            w.queue,
            caller,
            Some(agent),
            QueueEventKind::Answer,
            |e| {
                if let Journal::Queue { wait: x, .. } = e {
                    *x = Some(wait);
                }
            },
        );
        if let Some(a) = self.agents.get_mut(i) {
            a.status = AgentStatus::OnCall { caller };
            a.offer_expires = None;
            a.calls_taken += 1;
            a.call = Some(Connected {
                queue: w.queue,
                answered_at: now,
            });
        }
        if let Some(qs) = self.queues.get_mut(w.queue) {
            qs.answered += 1;
            if now.saturating_duration_since(w.since) <= SERVICE_LEVEL_TARGET {
                qs.answered_in_sl += 1;
            }
        }
    }

    /// The operator `agent` that `caller` was talking to is lost (a browser whose connection
    /// closed and did not come back, or whose media failed): the agent's call ends, and the
    /// caller goes back in line at the place it had (its arrival and priority: ahead of
    /// everyone who came after it, so usually first), to be offered to the next agent at once.
    /// Its announcements and maximum wait count again from now. `false` (nothing changes)
    /// unless the caller was answered by an agent and has not left.
    pub fn requeue(&mut self, now: Instant, caller: CallerId, agent: &str) -> bool {
        self.touch(now);
        if let Some(i) = self.agent_idx(agent) {
            if self
                .agents
                .get(i)
                .is_some_and(|a| a.status == AgentStatus::OnCall { caller })
            {
                self.end_call(now, i);
            }
        }
        let Some(p) = self.connected.remove(&caller) else {
            return false;
        };
        if self.waiting_idx(caller).is_some() {
            return false;
        }
        let (announce, max_wait) = self
            .queues
            .get(p.queue)
            .map_or((None, None), |qs| (qs.announce_every, qs.max_wait));
        let w = Waiting {
            caller,
            queue: p.queue,
            skill: p.skill,
            priority: p.priority,
            since: p.since,
            next_announce: announce.map(|e| later(now, e)),
            max_wait_at: max_wait.map(|m| later(now, m)),
            max_wait_sent: false,
            callback: None,
        };
        let at = self.waiting.partition_point(|x| {
            x.priority > p.priority || (x.priority == p.priority && x.since <= p.since)
        });
        self.waiting.insert(at, w);
        true
    }

    /// The offer to `agent` failed: the agent rests for `no_answer_pause_seconds` (or starts a
    /// pending pause); the caller keeps its place and is offered again on the next `poll`.
    /// Ignored unless that agent is ringing for that caller.
    pub(crate) fn offer_failed(
        &mut self,
        now: Instant,
        caller: CallerId,
        agent: &str,
        why: OfferFailure,
    ) {
        self.touch(now);
        if let Some(i) = self.agent_idx(agent) {
            if self.agents.get(i).is_some_and(|a| a.ringing_for(caller)) {
                debug!(caller, agent, ?why, "queue offer failed");
                self.fail_offer(now, i, caller);
            }
        }
    }

    /// The waiting `caller` asks to be called back and hangs up: its entry keeps its place
    /// and becomes a parked call-back (see the module docs), first dialled no earlier than
    /// `first_delay` from now. Agents ringing for it get `CancelOffer` (no penalty). `false`
    /// (and nothing changes) unless the caller is waiting on the line.
    pub(crate) fn request_callback(&mut self, now: Instant, caller: CallerId) -> bool {
        self.touch(now);
        let first = self.callback_policy.first_delay;
        let Some(w) = self
            .waiting
            .iter_mut()
            .find(|w| w.caller == caller && w.callback.is_none())
        else {
            return false;
        };
        w.callback = Some(Callback {
            phase: CallbackPhase::Parked {
                not_before: later(now, first),
            },
            attempts: 0,
        });
        w.next_announce = None;
        w.max_wait_at = None;
        let q = w.queue;
        if let Some(qs) = self.queues.get_mut(q) {
            qs.callbacks_requested += 1;
        }
        self.log(
            now,
            q,
            caller,
            None,
            QueueEventKind::CallbackRequested,
            |_| {},
        );
        self.cancel_offers(caller, None);
        true
    }

    /// The caller answered the call-back: the entry is on the line again, at its place, and
    /// is offered to agents from the next `poll`; `max_wait_seconds` counts from now.
    /// Ignored unless that call-back is dialling.
    pub(crate) fn callback_answered(&mut self, now: Instant, caller: CallerId) {
        self.touch(now);
        let Some(wi) = self.waiting_idx(caller) else {
            return;
        };
        let max_wait = self
            .waiting
            .get(wi)
            .and_then(|w| self.queues.get(w.queue))
            .and_then(|q| q.max_wait);
        if let Some(w) = self.waiting.get_mut(wi) {
            if let Some(cb) = w.callback.as_mut() {
                if matches!(cb.phase, CallbackPhase::Dialing { .. }) {
                    cb.phase = CallbackPhase::Answered;
                    w.max_wait_at = max_wait.map(|m| later(now, m));
                    w.max_wait_sent = false;
                }
            }
        }
    }

    /// The call-back dial failed (no answer, busy, unreachable): parked again for
    /// `retry_after`, or, after the last attempt, removed with `CallbackUnreached`. Ignored
    /// unless that call-back is dialling (a caller who hangs up after answering is `abandon`).
    pub(crate) fn callback_failed(&mut self, now: Instant, caller: CallerId) {
        self.touch(now);
        let Some(wi) = self.waiting_idx(caller) else {
            return;
        };
        let policy = self.callback_policy;
        let Some(w) = self.waiting.get_mut(wi) else {
            return;
        };
        let Some(cb) = w.callback.as_mut() else {
            return;
        };
        if !matches!(cb.phase, CallbackPhase::Dialing { .. }) {
            return;
        }
        if cb.attempts < policy.attempts {
            debug!(
                caller,
                attempts = cb.attempts,
                "call-back not answered; will retry"
            );
            cb.phase = CallbackPhase::Parked {
                not_before: later(now, policy.retry_after),
            };
            return;
        }
        let w = self.waiting.remove(wi);
        self.log(
            now,
            w.queue,
            caller,
            None,
            QueueEventKind::CallbackUnreached,
            |_| {},
        );
        if let Some(qs) = self.queues.get_mut(w.queue) {
            qs.callbacks_unreached += 1;
            qs.abandoned += 1;
        }
        self.outbox.push(Action::CallbackUnreached { caller });
    }

    /// `OnCall → WrapUp` for the queue's wrap-up time (or `Paused` if a pause was asked for).
    pub(crate) fn call_ended(&mut self, now: Instant, agent: &str) {
        self.touch(now);
        if let Some(AgentStatus::OnCall { caller }) =
            self.agent_mut(agent).map(|a| a.status.clone())
        {
            self.connected.remove(&caller);
        }
        if let Some(i) = self.agent_idx(agent) {
            self.end_call(now, i);
        }
    }

    /// Advance to `now`: end wrap-ups and pauses that are over, give up on unreported offers,
    /// make offers, send `MaxWait` and announcements. Returns everything to do, in order.
    pub(crate) fn poll(&mut self, now: Instant) -> Vec<Action> {
        self.touch(now);
        // Rests that are over.
        for a in &mut self.agents {
            if let AgentStatus::WrapUp { until } | AgentStatus::NoAnswerPause { until } = a.status {
                if until <= now {
                    a.status = AgentStatus::Available;
                }
            }
        }
        // Offers whose outcome never came.
        let stale: Vec<(usize, CallerId)> = self
            .agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a.status {
                AgentStatus::Ringing { caller } if a.offer_expires.is_some_and(|t| t <= now) => {
                    Some((i, caller))
                }
                _ => None,
            })
            .collect();
        for (i, caller) in stale {
            if let Some(a) = self.agents.get(i) {
                warn!(caller, agent = %a.id, "queue offer outcome never reported; withdrawing");
                self.outbox.push(Action::CancelOffer {
                    caller,
                    agent: a.id.clone(),
                });
            }
            self.fail_offer(now, i, caller);
        }
        // Call-back dials whose outcome never came.
        let lost: Vec<CallerId> = self
            .waiting
            .iter()
            .filter(|w| {
                matches!(w.callback, Some(Callback { phase: CallbackPhase::Dialing { expires }, .. }) if expires <= now)
            })
            .map(|w| w.caller)
            .collect();
        for caller in lost {
            warn!(
                caller,
                "call-back dial outcome never reported; counted as unanswered"
            );
            self.callback_failed(now, caller);
        }
        self.make_offers(now);
        self.max_waits(now);
        self.announcements(now);
        std::mem::take(&mut self.outbox)
    }

    /// When `poll` next has something to do (`None`: only after the next input).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if !self.outbox.is_empty() {
            return self.now;
        }
        let ringing = self.ringing_callers();
        let now = self.now;
        let agents = self.agents.iter().filter_map(|a| match a.status {
            AgentStatus::WrapUp { until } | AgentStatus::NoAnswerPause { until } => Some(until),
            AgentStatus::Ringing { .. } => a.offer_expires,
            // A refused claim's wait, when someone is waiting who might take the agent.
            AgentStatus::Available if !self.waiting.is_empty() => {
                a.not_before.filter(|t| now.is_none_or(|n| *t > n))
            }
            _ => None,
        });
        let callers = self.waiting.iter().flat_map(|w| {
            let max_wait = if w.max_wait_sent || ringing.contains(&w.caller) {
                None
            } else {
                w.max_wait_at
            };
            // A parked call-back matters when its retry time comes (later, it waits for an
            // agent, which is an input); a dial when its outcome is overdue.
            let callback = match w.callback.map(|c| c.phase) {
                Some(CallbackPhase::Parked { not_before }) => {
                    now.is_none_or(|n| not_before > n).then_some(not_before)
                }
                Some(CallbackPhase::Dialing { expires }) => Some(expires),
                _ => None,
            };
            [w.next_announce, max_wait, callback].into_iter().flatten()
        });
        agents.chain(callers).min()
    }

    /// A waiting caller's place and EWT (`None` if not waiting).
    pub(crate) fn position(&self, caller: CallerId) -> Option<Position> {
        self.waiting_idx(caller).map(|wi| self.position_at(wi))
    }

    /// Every queue (configured first, then those created on demand).
    /// `agents` counts the queue's members (every agent for a queue without `members`).
    pub(crate) fn figures(&self) -> Vec<QueueFigures> {
        self.queues
            .iter()
            .enumerate()
            .map(|(qi, q)| {
                let mut counts = AgentCounts::default();
                for a in self.agents.iter().filter(|a| q.serves(a)) {
                    let c = match a.status {
                        AgentStatus::LoggedOut => &mut counts.logged_out,
                        AgentStatus::Available => &mut counts.available,
                        AgentStatus::Ringing { .. } => &mut counts.ringing,
                        AgentStatus::OnCall { .. } => &mut counts.on_call,
                        AgentStatus::WrapUp { .. } => &mut counts.wrap_up,
                        AgentStatus::NoAnswerPause { .. } => &mut counts.no_answer_pause,
                        AgentStatus::Paused { .. } => &mut counts.paused,
                    };
                    *c += 1;
                }
                let here = || self.waiting.iter().filter(move |w| w.queue == qi);
                let waiting = here().count();
                let callbacks_pending = here().filter(|w| w.callback.is_some()).count();
                let longest_wait = match (self.now, here().map(|w| w.since).min()) {
                    (Some(now), Some(since)) => now.saturating_duration_since(since),
                    _ => Duration::ZERO,
                };
                let left = q.answered + q.abandoned;
                QueueFigures {
                    name: q.name.clone(),
                    strategy: strategy_name(q.strategy),
                    waiting,
                    longest_wait,
                    agents: counts,
                    answered: q.answered,
                    abandoned: q.abandoned,
                    answered_within_30s: q.answered_in_sl,
                    abandoned_within_30s: q.abandoned_in_sl,
                    max_wait_reached: q.max_wait_reached,
                    refused: q.refused,
                    service_level: (left > 0).then(|| q.answered_in_sl as f64 / left as f64),
                    average_handle_time: q.aht(),
                    ewt: self.ewt(qi, None, waiting + 1),
                    callbacks_pending,
                    callbacks_requested: q.callbacks_requested,
                    callbacks_unreached: q.callbacks_unreached,
                }
            })
            .collect()
    }

    /// Every agent, in config order.
    pub(crate) fn agents(&self) -> Vec<AgentView> {
        self.agents
            .iter()
            .map(|a| {
                let since = |t: Instant| self.now.map(|n| n.saturating_duration_since(t));
                let until = |t: Instant| self.now.map(|n| t.saturating_duration_since(n));
                let (caller, seconds_left, pause_reason) = match &a.status {
                    AgentStatus::Ringing { caller } | AgentStatus::OnCall { caller } => {
                        (Some(*caller), None, a.pause_after.clone())
                    }
                    AgentStatus::WrapUp { until: t } | AgentStatus::NoAnswerPause { until: t } => {
                        (None, until(*t).map(|d| d.as_secs()), None)
                    }
                    AgentStatus::Paused { reason } => (None, None, Some(reason.clone())),
                    AgentStatus::LoggedOut | AgentStatus::Available => (None, None, None),
                };
                let idle_seconds = match a.status {
                    AgentStatus::Available => a.idle_since.and_then(since).map(|d| d.as_secs()),
                    _ => None,
                };
                AgentView {
                    id: a.id.clone(),
                    name: a.name.clone(),
                    status: a.status.clone(),
                    state: a.status.as_str(),
                    caller,
                    pause_reason,
                    seconds_left,
                    calls_taken: a.calls_taken,
                    idle_since: a.idle_since,
                    idle_seconds,
                    skills: a.skills.clone(),
                    tier: a.tier,
                    registered: a.registered,
                    signed_off: a.signed_off,
                    busy_elsewhere: a.held_elsewhere,
                    state_seconds: a
                        .journaled
                        .as_ref()
                        .and_then(|(_, _, t)| since(*t))
                        .map(|d| d.as_secs()),
                    queue: a
                        .call
                        .as_ref()
                        .and_then(|c| self.queues.get(c.queue))
                        .map(|q| q.name.clone()),
                }
            })
            .collect()
    }

    /// Every caller waiting, in the order they are served (call-backs keeping their place
    /// included).
    pub(crate) fn waiting_callers(&self) -> Vec<WaitingView> {
        self.waiting
            .iter()
            .map(|w| WaitingView {
                caller: w.caller,
                queue: self
                    .queues
                    .get(w.queue)
                    .map(|q| q.name.clone())
                    .unwrap_or_default(),
                waited_seconds: self
                    .now
                    .map_or(0, |n| n.saturating_duration_since(w.since).as_secs()),
                callback: w.callback.is_some(),
                ringing: self
                    .agents
                    .iter()
                    .find(|a| a.ringing_for(w.caller))
                    .map(|a| a.id.clone()),
            })
            .collect()
    }

    // ---- internals ----

    /// Everything recorded since the last call, after noting the agents' states as of
    /// `now`: each state an agent left gives its span. Call it after every input, with that
    /// input's `now` (the driver does): states are noted when it is called, so a state that
    /// begins and ends within one input (it lasted no time) is not seen.
    pub fn take_journal(&mut self, now: Instant) -> Vec<Journal> {
        for a in &mut self.agents {
            let reason = match &a.status {
                AgentStatus::Paused { reason } => Some(reason.clone()),
                _ => None,
            };
            let state = a.status.as_str();
            match &a.journaled {
                None if a.status == AgentStatus::LoggedOut => {}
                None => a.journaled = Some((state, reason, now)),
                Some((s, r, _)) if *s == state && *r == reason => {}
                Some(_) => {
                    if let Some((s, r, from)) = a.journaled.replace((state, reason, now)) {
                        self.journal.push(Journal::AgentState {
                            agent: a.id.clone(),
                            state: s,
                            reason: r,
                            from,
                            to: now,
                        });
                    }
                }
            }
        }
        std::mem::take(&mut self.journal)
    }

    /// The spans of the states agents are in now, ended at `now` (the server is stopping).
    pub fn close_journal(&mut self, now: Instant) -> Vec<Journal> {
        let mut out = self.take_journal(now);
        for a in &mut self.agents {
            if let Some((state, reason, from)) = a.journaled.take() {
                out.push(Journal::AgentState {
                    agent: a.id.clone(),
                    state,
                    reason,
                    from,
                    to: now,
                });
            }
        }
        out
    }

    /// Record a queue event for the caller in queue `q`.
    fn log(
        &mut self,
        now: Instant,
        q: usize,
        caller: CallerId,
        agent: Option<&str>,
        event: QueueEventKind,
        fill: impl FnOnce(&mut Journal),
    ) {
        let Some(queue) = self.queues.get(q) else {
            return;
        };
        let mut e = Journal::Queue {
            at: now,
            queue: queue.name.clone(),
            caller,
            agent: agent.map(str::to_owned),
            event,
            wait: None,
            talk: None,
            position: None,
        };
        fill(&mut e);
        self.journal.push(e);
    }

    fn touch(&mut self, now: Instant) {
        self.now = Some(self.now.map_or(now, |n| n.max(now)));
    }

    fn agent_idx(&self, id: &str) -> Option<usize> {
        self.agents.iter().position(|a| a.id == id)
    }

    fn agent_mut(&mut self, id: &str) -> Option<&mut Agent> {
        self.agents.iter_mut().find(|a| a.id == id)
    }

    fn queue_idx(&self, name: &str) -> Option<usize> {
        self.queues.iter().position(|q| q.name == name)
    }

    fn queue_or_default(&mut self, name: &str) -> usize {
        if let Some(q) = self.queue_idx(name) {
            return q;
        }
        self.queues.push(QueueState::new(&QueueConfig {
            name: name.to_owned(),
            ..QueueConfig::default()
        }));
        self.queues.len() - 1
    }

    /// Whether `agent` may take a caller with `skill` waiting in queue `q`: a member of it
    /// who speaks the caller's language.
    fn takes(&self, q: usize, agent: &Agent, skill: Option<&str>) -> bool {
        agent.can_take(skill) && self.queues.get(q).is_some_and(|qs| qs.serves(agent))
    }

    fn waiting_idx(&self, caller: CallerId) -> Option<usize> {
        self.waiting.iter().position(|w| w.caller == caller)
    }

    /// Whether the caller is waiting, connected, or ringing an agent directly (the driver
    /// keeps its events sender so long). Connected means talking to an agent, or answered by
    /// one whose agent has logged out since (a browser whose connection dropped): such a
    /// caller may be requeued and must still hear its offers.
    fn holds(&self, caller: CallerId) -> bool {
        self.waiting_idx(caller).is_some()
            || self.connected.contains_key(&caller)
            || self.agents.iter().any(|a| {
                a.status == AgentStatus::OnCall { caller }
                    || a.status == AgentStatus::Ringing { caller }
            })
    }

    fn ringing_callers(&self) -> HashSet<CallerId> {
        self.agents
            .iter()
            .filter_map(|a| match a.status {
                AgentStatus::Ringing { caller } => Some(caller),
                _ => None,
            })
            .collect()
    }

    fn position_at(&self, wi: usize) -> Position {
        let Some(w) = self.waiting.get(wi) else {
            return Position {
                place: 0,
                ewt: Duration::ZERO,
            };
        };
        let place = self
            .waiting
            .iter()
            .take(wi)
            .filter(|x| x.queue == w.queue)
            .count()
            + 1;
        Position {
            place,
            ewt: self.ewt(w.queue, w.skill.as_deref(), place),
        }
    }

    fn ewt(&self, queue: usize, skill: Option<&str>, place: usize) -> Duration {
        let Some(q) = self.queues.get(queue) else {
            return Duration::ZERO;
        };
        let mut staffed = 0usize;
        let mut free = 0usize;
        for a in self.agents.iter().filter(|a| self.takes(queue, a, skill)) {
            match a.status {
                AgentStatus::LoggedOut | AgentStatus::Paused { .. } => {}
                AgentStatus::Available if !a.held_elsewhere => {
                    staffed += 1;
                    free += 1;
                }
                _ => staffed += 1,
            }
        }
        let ahead = place.saturating_sub(free);
        let rounds = ahead.div_ceil(staffed.max(1));
        q.aht()
            .saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
    }

    fn cancel_offers(&mut self, caller: CallerId, except: Option<usize>) {
        for (i, a) in self.agents.iter_mut().enumerate() {
            if Some(i) != except && a.ringing_for(caller) {
                self.outbox.push(Action::CancelOffer {
                    caller,
                    agent: a.id.clone(),
                });
                a.release();
            }
        }
    }

    fn fail_offer(&mut self, now: Instant, i: usize, caller: CallerId) {
        let pause = self
            .waiting_idx(caller)
            .and_then(|wi| self.waiting.get(wi))
            .and_then(|w| self.queues.get(w.queue))
            .map_or(
                setting(QueueConfig::default().no_answer_pause_seconds),
                |q| q.no_answer_pause,
            );
        if let Some(a) = self.agents.get_mut(i) {
            a.offer_expires = None;
            a.status = match a.pause_after.take() {
                Some(reason) => AgentStatus::Paused { reason },
                None => AgentStatus::NoAnswerPause {
                    until: later(now, pause),
                },
            };
        }
    }

    /// Which agents another node of the cluster holds now (every other agent is free of
    /// holds elsewhere). A held agent is not offered here; one ringing or talking here is
    /// left alone (the holds are this node's own then).
    pub(crate) fn set_held_elsewhere(&mut self, now: Instant, held: &HashSet<String>) {
        self.touch(now);
        for a in &mut self.agents {
            a.held_elsewhere = held.contains(&a.id);
        }
    }

    /// The cluster refused this node's claim on `agent` for `caller` (another node holds the
    /// agent, or has an earlier caller the agent can take): the offer is withdrawn at no
    /// cost to the agent, the caller keeps its place, and the agent is not offered here again
    /// before `retry_after`. Ignored unless that agent is ringing for that caller.
    pub(crate) fn claim_refused(
        &mut self,
        now: Instant,
        caller: CallerId,
        agent: &str,
        retry_after: Duration,
    ) {
        self.touch(now);
        if let Some(a) = self.agent_mut(agent) {
            if a.ringing_for(caller) {
                a.release();
                a.not_before = Some(later(now, retry_after));
            }
        }
    }

    /// Whether `agent` is ringing for `caller` now.
    pub(crate) fn is_ringing_for(&self, agent: &str, caller: CallerId) -> bool {
        self.agent_idx(agent)
            .and_then(|i| self.agents.get(i))
            .is_some_and(|a| a.ringing_for(caller))
    }

    /// The callers waiting for an agent now, in line order: not call-backs still parked or
    /// being dialled, not callers whose agent's phone rings. What other nodes of the
    /// cluster see of this node's line.
    pub(crate) fn line(&self) -> Vec<LineEntry> {
        let ringing = self.ringing_callers();
        self.waiting
            .iter()
            .filter(|w| w.offerable() && !ringing.contains(&w.caller))
            .filter_map(|w| self.line_entry_of(w))
            .collect()
    }

    /// [`Dispatcher::line`]'s entry for one waiting caller (ringing or not).
    pub(crate) fn line_entry(&self, caller: CallerId) -> Option<LineEntry> {
        let w = self.waiting.get(self.waiting_idx(caller)?)?;
        self.line_entry_of(w)
    }

    fn line_entry_of(&self, w: &Waiting) -> Option<LineEntry> {
        Some(LineEntry {
            caller: w.caller,
            queue: self.queues.get(w.queue)?.name.clone(),
            skill: w.skill.clone(),
            priority: w.priority,
            since: w.since,
        })
    }

    /// What decides which callers `agent` can take, for comparing with other nodes' lines.
    pub(crate) fn takes_of(&self, agent: &str) -> Option<Takes> {
        let a = self.agents.get(self.agent_idx(agent)?)?;
        Some(Takes {
            skills: a.skills.clone(),
            queues: self
                .queues
                .iter()
                .map(|q| (q.name.clone(), q.serves(a)))
                .collect(),
        })
    }

    /// Withdraw an offer that could not be delivered (or that the caller's side will not
    /// ring, e.g. the extra phones of a `ring_all` round for a call-back), at no cost to the
    /// agent. Ignored unless that agent is ringing for that caller.
    pub(crate) fn withdraw_offer(&mut self, caller: CallerId, agent: &str) {
        if let Some(a) = self.agent_mut(agent) {
            if a.ringing_for(caller) {
                a.release();
            }
        }
    }

    fn end_call(&mut self, now: Instant, i: usize) {
        let Some(a) = self.agents.get_mut(i) else {
            return;
        };
        if !matches!(a.status, AgentStatus::OnCall { .. }) {
            return;
        }
        let mut wrap_up = setting(QueueConfig::default().wrap_up_seconds);
        let caller = match a.status {
            AgentStatus::OnCall { caller } => caller,
            _ => 0,
        };
        let agent = a.id.clone();
        if let Some(c) = a.call.take() {
            let talk = now.saturating_duration_since(c.answered_at);
            if let Some(q) = self.queues.get_mut(c.queue) {
                if q.talk_times.len() >= AHT_SAMPLES {
                    q.talk_times.pop_front();
                }
                q.talk_times.push_back(talk);
                wrap_up = q.wrap_up;
            }
            self.log(
                now,
                c.queue,
                caller,
                Some(&agent),
                QueueEventKind::Complete,
                |e| {
                    if let Journal::Queue { talk: t, .. } = e {
                        *t = Some(talk);
                    }
                },
            );
        }
        let Some(a) = self.agents.get_mut(i) else {
            return;
        };
        a.idle_since = Some(now);
        a.status = match a.pause_after.take() {
            _ if a.signed_off => {
                a.idle_since = None;
                AgentStatus::LoggedOut
            }
            Some(reason) => AgentStatus::Paused { reason },
            None => AgentStatus::WrapUp {
                until: later(now, wrap_up),
            },
        };
    }

    fn make_offers(&mut self, now: Instant) {
        let mut ringing = self.ringing_callers();
        // Free agents held back for call-backs being dialled (ahead of the entries after them).
        let mut claimed: HashSet<usize> = HashSet::new();
        let policy = self.callback_policy;
        for w in &mut self.waiting {
            if !self.agents.iter().any(|a| a.offerable(now)) {
                return;
            }
            if ringing.contains(&w.caller) {
                continue;
            }
            let member = |a: &Agent| self.queues.get(w.queue).is_some_and(|q| q.serves(a));
            if let Some(cb) = w.callback.as_mut() {
                let free = self.agents.iter().enumerate().find(|(i, a)| {
                    a.offerable(now)
                        && a.can_take(w.skill.as_deref())
                        && member(a)
                        && !claimed.contains(i)
                });
                match cb.phase {
                    CallbackPhase::Answered => {}
                    CallbackPhase::Dialing { .. } => {
                        if let Some((i, _)) = free {
                            claimed.insert(i);
                        }
                        continue;
                    }
                    CallbackPhase::Parked { not_before } => {
                        if let Some((i, _)) = free.filter(|_| not_before <= now) {
                            claimed.insert(i);
                            cb.attempts += 1;
                            cb.phase = CallbackPhase::Dialing {
                                expires: later(now, policy.ring_timeout + OFFER_GRACE),
                            };
                            self.outbox.push(Action::DialBack {
                                caller: w.caller,
                                attempt: cb.attempts,
                                ring_timeout: policy.ring_timeout,
                            });
                        }
                        continue;
                    }
                }
            }
            let candidates: Vec<usize> = self
                .agents
                .iter()
                .enumerate()
                .filter(|(i, a)| {
                    a.offerable(now)
                        && a.can_take(w.skill.as_deref())
                        && member(a)
                        && !claimed.contains(i)
                })
                .map(|(i, _)| i)
                .collect();
            let Some(q) = self.queues.get_mut(w.queue) else {
                continue;
            };
            let chosen = choose(q, &self.agents, candidates);
            for i in chosen {
                let Some(a) = self.agents.get_mut(i) else {
                    continue;
                };
                a.status = AgentStatus::Ringing { caller: w.caller };
                a.offer_expires = Some(later(now, q.ring_timeout + OFFER_GRACE));
                self.journal.push(Journal::Queue {
                    at: now,
                    queue: q.name.clone(),
                    caller: w.caller,
                    agent: Some(a.id.clone()),
                    event: QueueEventKind::Offer,
                    wait: None,
                    talk: None,
                    position: None,
                });
                self.outbox.push(Action::Offer {
                    caller: w.caller,
                    agent: a.id.clone(),
                    ring_timeout: q.ring_timeout,
                });
                if q.strategy == Strategy::RoundRobin {
                    q.rr_last = Some(i);
                }
                ringing.insert(w.caller);
            }
        }
    }

    fn max_waits(&mut self, now: Instant) {
        let ringing = self.ringing_callers();
        for w in &mut self.waiting {
            if w.max_wait_sent || ringing.contains(&w.caller) || !w.offerable() {
                continue;
            }
            let due = w.max_wait_at.is_some_and(|t| t <= now);
            let skill = w.skill.as_deref();
            let queue = self.queues.get(w.queue);
            let stranded = !self
                .agents
                .iter()
                .any(|a| a.logged_in() && a.can_take(skill) && queue.is_some_and(|q| q.serves(a)));
            if due || stranded {
                w.max_wait_sent = true;
                self.outbox.push(Action::MaxWait { caller: w.caller });
                if let Some(q) = self.queues.get_mut(w.queue) {
                    q.max_wait_reached += 1;
                    // No announcement on top of the ticket/call-back offer.
                    w.next_announce = q.announce_every.map(|e| later(now, e));
                }
            }
        }
    }

    fn announcements(&mut self, now: Instant) {
        let ringing = self.ringing_callers();
        for wi in 0..self.waiting.len() {
            let Some(w) = self.waiting.get(wi) else {
                continue;
            };
            if w.next_announce.is_none_or(|t| t > now) {
                continue;
            }
            let caller = w.caller;
            let every = self.queues.get(w.queue).and_then(|q| q.announce_every);
            let position = self.position_at(wi);
            if let Some(w) = self.waiting.get_mut(wi) {
                w.next_announce = every.map(|e| later(now, e));
            }
            if !ringing.contains(&caller) {
                self.outbox.push(Action::Announce { caller, position });
            }
        }
    }
}

/// Pick the agent(s) to ring among `candidates` (available and able to take the caller).
fn choose(q: &QueueState, agents: &[Agent], candidates: Vec<usize>) -> Vec<usize> {
    let tier_of = |i: &usize| agents.get(*i).map_or(u32::MAX, |a| a.tier);
    let Some(best) = candidates.iter().map(tier_of).min() else {
        return Vec::new();
    };
    let mut best_tier: Vec<usize> = candidates
        .into_iter()
        .filter(|i| tier_of(i) == best)
        .collect();
    let pick = match q.strategy {
        Strategy::RingAll => return best_tier,
        Strategy::LongestIdle => best_tier
            .iter()
            .copied()
            .min_by_key(|&i| (agents.get(i).and_then(|a| a.idle_since), i)),
        Strategy::FewestCalls => best_tier
            .iter()
            .copied()
            .min_by_key(|&i| (agents.get(i).map_or(u64::MAX, |a| a.calls_taken), i)),
        Strategy::RoundRobin => {
            let n = agents.len().max(1);
            let start = q.rr_last.map_or(0, |l| l + 1);
            best_tier.sort_by_key(|&i| (i + n - start % n) % n);
            best_tier.first().copied()
        }
    };
    pick.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// The tokio driver.

/// What a queued call hears about, on the sender it registered at `enqueue`. The channel
/// closing means the queue is gone (shutdown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QueueEvent {
    Offer {
        agent: String,
        ring_timeout: Duration,
    },
    CancelOffer {
        agent: String,
    },
    Announce(Position),
    MaxWait,
}

/// What a call-back's driver (`crate::call::callback`) hears about, on the sender it gave to
/// [`QueueHandle::request_callback`]. The channel closing means the queue is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallbackEvent {
    /// Ring the caller back now (see [`Action::DialBack`]).
    DialBack {
        attempt: u32,
        ring_timeout: Duration,
    },
    /// Every dial failed; the entry has left the line.
    Unreached,
    /// Once answered, the entry hears what any waiting call hears.
    Queue(QueueEvent),
}

/// What the call tells the queue about its caller, for the operator's screen
/// ([`AgentNotice::Offer`]). Personal data (the number): shown to the operator, never
/// logged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CallerContext {
    /// The caller's number as the call has it (From, or the asserted identity).
    pub number: String,
    pub call_id: String,
    pub language: String,
    /// How the caller got here, e.g. `language:1 > screening:1 > main:1 > streets:1`.
    pub menu_path: String,
    /// The service of a request the caller started and did not file (they went to an
    /// operator on the way), for the operator's ticket form.
    pub service_code: Option<String>,
    /// The ZIP code the caller typed for that request.
    pub zipcode: Option<String>,
}

/// An offer to an operator, with the caller's context.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OfferView {
    pub agent: String,
    /// The queue's id of the caller (what `decline` names).
    pub caller: CallerId,
    pub queue: String,
    /// Seconds waited in the queue so far.
    pub waited_seconds: u64,
    /// The server called the caller back.
    pub callback: bool,
    /// What the call told the queue (`None` for callers queued without it).
    pub context: Option<Arc<CallerContext>>,
}

/// What the queue tells operators' consoles ([`QueueHandle::notices`]).
#[derive(Debug, Clone, PartialEq)]
pub enum AgentNotice {
    /// An agent's state changed (status, pause reason, caller, wrap-up end).
    State(AgentView),
    /// An agent's phone started ringing for a caller.
    Offer(OfferView),
}

impl AgentNotice {
    /// The agent it concerns.
    pub fn agent(&self) -> &str {
        match self {
            AgentNotice::State(v) => &v.id,
            AgentNotice::Offer(o) => &o.agent,
        }
    }
}

/// One agent as its console sees it: its state, and the caller ringing or connected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentConsoleView {
    pub agent: AgentView,
    pub offer: Option<OfferView>,
}

/// How many notices a slow console may fall behind before it must resynchronise.
const NOTICE_BUFFER: usize = 256;

/// Where a waiting entry's events go: the caller's own call, or its call-back driver.
enum Listener {
    Call(mpsc::Sender<QueueEvent>),
    Callback(mpsc::Sender<CallbackEvent>),
}

impl ClusterLink {
    /// Hold the agent in the cluster while this node has it busy (ringing, on a call, in
    /// wrap-up or a no-answer pause, paused, signed off with the phone registered); let it go
    /// when it is available or logged out here. A claim in flight is left to its answer.
    fn keep_hold(&mut self, v: &AgentView) {
        if self.pending.contains_key(&v.id) {
            return;
        }
        let busy = match v.status {
            AgentStatus::Available => false,
            AgentStatus::LoggedOut => v.registered && v.signed_off,
            _ => true,
        };
        let held = self.held.contains(&v.id);
        let cmd = match (busy, held) {
            (true, false) => ClusterCmd::Hold(v.id.clone()),
            (false, true) => ClusterCmd::Release(v.id.clone()),
            _ => return,
        };
        // Not sent (the cluster task is swamped): asked again at the next pass.
        if self.tx.try_send(cmd).is_ok() {
            if busy {
                self.held.insert(v.id.clone());
            } else {
                self.held.remove(&v.id);
            }
        }
    }
}

impl Listener {
    fn is_closed(&self) -> bool {
        match self {
            Listener::Call(tx) => tx.is_closed(),
            Listener::Callback(tx) => tx.is_closed(),
        }
    }

    /// `Err(true)`: closed; `Err(false)`: full.
    fn try_send(&self, ev: CallbackEvent) -> Result<(), bool> {
        use mpsc::error::TrySendError;
        fn flag<T>(e: TrySendError<T>) -> bool {
            matches!(e, TrySendError::Closed(_))
        }
        match (self, ev) {
            (Listener::Call(tx), CallbackEvent::Queue(q)) => tx.try_send(q).map_err(flag),
            // A call on the line has no use for call-back events (none are sent to one).
            (Listener::Call(_), _) => Ok(()),
            (Listener::Callback(tx), ev) => tx.try_send(ev).map_err(flag),
        }
    }
}

/// Commands queued to the driver task before callers feel back-pressure.
const COMMAND_QUEUE: usize = 1024;
/// How often the driver looks for calls whose events receiver is gone.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

enum Cmd {
    Enqueue {
        caller: CallerId,
        queue: String,
        skill: Option<String>,
        priority: i32,
        context: Option<Arc<CallerContext>>,
        events: mpsc::Sender<QueueEvent>,
        reply: oneshot::Sender<Result<Position, Refusal>>,
    },
    Rejoin {
        caller: CallerId,
        queue: String,
        skill: Option<String>,
        since: Instant,
        events: mpsc::Sender<QueueEvent>,
        reply: oneshot::Sender<Result<Position, Refusal>>,
    },
    RingDirect {
        caller: CallerId,
        agent: String,
        ring_timeout: Duration,
        reply: oneshot::Sender<Result<(), &'static str>>,
    },
    DirectAnswered(CallerId, String),
    Abandon(CallerId),
    RequestCallback {
        caller: CallerId,
        events: mpsc::Sender<CallbackEvent>,
        reply: oneshot::Sender<bool>,
    },
    CallbackAnswered(CallerId),
    Withdraw(CallerId, String),
    CallbackFailed(CallerId),
    Answered(CallerId, String),
    Requeue(CallerId, String),
    Failed(CallerId, String, OfferFailure),
    CallEnded(String),
    LoggedIn(String),
    LoggedOut(String),
    Pause(String, String, oneshot::Sender<bool>),
    Unpause(String, oneshot::Sender<bool>),
    Figures(oneshot::Sender<Vec<QueueFigures>>),
    Agents(oneshot::Sender<Vec<AgentView>>),
    Waiting(oneshot::Sender<Vec<WaitingView>>),
    Request(
        String,
        AgentRequest,
        oneshot::Sender<Result<(), RequestRefusal>>,
    ),
    Decline(CallerId, String, oneshot::Sender<bool>),
    Console(String, oneshot::Sender<Option<AgentConsoleView>>),
    /// From here on, offers are claimed through the cluster ([`crate::dispatch::cluster`]).
    JoinCluster(mpsc::Sender<ClusterCmd>),
    /// The cluster's answer to a [`ClusterCmd::Claim`].
    Claimed {
        caller: CallerId,
        agent: String,
        reply: ClaimReply,
    },
    /// The agents other nodes hold now.
    HeldElsewhere(HashSet<String>),
    /// This node's line for the other nodes, with each caller's arrival in epoch ms.
    Line(oneshot::Sender<Vec<(LineEntry, i64)>>),
}

/// A cheap handle on the running dispatcher, for calls and the admin API. Once the driver has
/// stopped, `enqueue` answers `NoAgents`, `pause`/`unpause` `false`, lists are empty.
#[derive(Clone)]
pub(crate) struct QueueHandle {
    tx: mpsc::Sender<Cmd>,
    notices: broadcast::Sender<AgentNotice>,
}

impl QueueHandle {
    /// Queue a caller; its events go to `events` until it is answered and its call ends, or
    /// it abandons. If `events` closes (the call is gone), the caller is abandoned.
    #[cfg(test)]
    pub(crate) async fn enqueue(
        &self,
        caller: CallerId,
        queue: &str,
        skill: Option<String>,
        priority: i32,
        events: mpsc::Sender<QueueEvent>,
    ) -> Result<Position, Refusal> {
        self.enqueue_with_context(caller, queue, skill, priority, None, events)
            .await
    }

    /// Queue a caller, telling the queue who they are for the operators' consoles they are
    /// offered to ([`AgentNotice::Offer`]); its events go to `events` until it is answered and
    /// its call ends, or it abandons. If `events` closes (the call is gone), the caller is
    /// abandoned.
    pub async fn enqueue_with_context(
        &self,
        caller: CallerId,
        queue: &str,
        skill: Option<String>,
        priority: i32,
        context: Option<CallerContext>,
        events: mpsc::Sender<QueueEvent>,
    ) -> Result<Position, Refusal> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Enqueue {
            caller,
            queue: queue.to_owned(),
            skill,
            priority,
            context: context.map(Arc::new),
            events,
            reply,
        };
        if self.tx.send(cmd).await.is_err() {
            return Err(Refusal::NoAgents);
        }
        rx.await.unwrap_or(Err(Refusal::NoAgents))
    }

    pub(crate) async fn abandon(&self, caller: CallerId) {
        self.send(Cmd::Abandon(caller)).await;
    }

    /// [`Dispatcher::rejoin`]: the caller back at the front of `queue`, its wait counted from
    /// `since`; its events go to `events` as for [`QueueHandle::enqueue_with_context`].
    pub async fn rejoin(
        &self,
        caller: CallerId,
        queue: &str,
        skill: Option<String>,
        since: Instant,
        events: mpsc::Sender<QueueEvent>,
    ) -> Result<Position, Refusal> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Rejoin {
            caller,
            queue: queue.to_owned(),
            skill,
            since,
            events,
            reply,
        };
        if self.tx.send(cmd).await.is_err() {
            return Err(Refusal::NoAgents);
        }
        rx.await.unwrap_or(Err(Refusal::NoAgents))
    }

    /// [`Dispatcher::ring_direct`]; `Err` with the agent's state when it cannot take a call.
    pub async fn ring_direct(
        &self,
        caller: CallerId,
        agent: &str,
        ring_timeout: Duration,
    ) -> Result<(), &'static str> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::RingDirect {
            caller,
            agent: agent.to_owned(),
            ring_timeout,
            reply,
        })
        .await;
        rx.await.unwrap_or(Err("logged_out"))
    }

    pub async fn direct_answered(&self, caller: CallerId, agent: &str) {
        self.send(Cmd::DirectAnswered(caller, agent.to_owned()))
            .await;
    }

    /// The waiting `caller` asks for a call-back that keeps its place
    /// ([`Dispatcher::request_callback`]); from now on its events go to `events` (the call
    /// can hang up). `false` if it was not waiting (or the queue has stopped).
    pub(crate) async fn request_callback(
        &self,
        caller: CallerId,
        events: mpsc::Sender<CallbackEvent>,
    ) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::RequestCallback {
            caller,
            events,
            reply,
        })
        .await;
        rx.await.unwrap_or(false)
    }

    /// The offer will not be rung (see [`Dispatcher::withdraw_offer`]).
    pub(crate) async fn offer_withdrawn(&self, caller: CallerId, agent: &str) {
        self.send(Cmd::Withdraw(caller, agent.to_owned())).await;
    }

    pub(crate) async fn callback_answered(&self, caller: CallerId) {
        self.send(Cmd::CallbackAnswered(caller)).await;
    }

    pub(crate) async fn callback_failed(&self, caller: CallerId) {
        self.send(Cmd::CallbackFailed(caller)).await;
    }

    pub(crate) async fn offer_answered(&self, caller: CallerId, agent: &str) {
        self.send(Cmd::Answered(caller, agent.to_owned())).await;
    }

    /// [`Dispatcher::requeue`]: the caller's operator is lost; back in line.
    pub(crate) async fn requeue(&self, caller: CallerId, agent: &str) {
        self.send(Cmd::Requeue(caller, agent.to_owned())).await;
    }

    pub(crate) async fn offer_failed(&self, caller: CallerId, agent: &str, why: OfferFailure) {
        self.send(Cmd::Failed(caller, agent.to_owned(), why)).await;
    }

    pub(crate) async fn call_ended(&self, agent: &str) {
        self.send(Cmd::CallEnded(agent.to_owned())).await;
    }

    pub(crate) async fn agent_logged_in(&self, agent: &str) {
        self.send(Cmd::LoggedIn(agent.to_owned())).await;
    }

    pub(crate) async fn agent_logged_out(&self, agent: &str) {
        self.send(Cmd::LoggedOut(agent.to_owned())).await;
    }

    /// Offers are claimed through the cluster from now on: each goes to the agent's phone
    /// only once `cluster` granted it (see [`crate::dispatch::cluster`]).
    pub(crate) async fn join_cluster(&self, cluster: mpsc::Sender<ClusterCmd>) {
        self.send(Cmd::JoinCluster(cluster)).await;
    }

    /// The cluster's answer to a claim.
    pub(crate) async fn claimed(&self, caller: CallerId, agent: String, reply: ClaimReply) {
        self.send(Cmd::Claimed {
            caller,
            agent,
            reply,
        })
        .await;
    }

    /// The agents other nodes of the cluster hold now.
    pub(crate) async fn held_elsewhere(&self, held: HashSet<String>) {
        self.send(Cmd::HeldElsewhere(held)).await;
    }

    /// The callers waiting here for an agent, with their arrival (epoch ms), for the cluster.
    pub(crate) async fn line(&self) -> Vec<(LineEntry, i64)> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Line(reply)).await;
        rx.await.unwrap_or_default()
    }

    pub(crate) async fn pause(&self, agent: &str, reason: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Pause(agent.to_owned(), reason.to_owned(), reply))
            .await;
        rx.await.unwrap_or(false)
    }

    pub(crate) async fn unpause(&self, agent: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Unpause(agent.to_owned(), reply)).await;
        rx.await.unwrap_or(false)
    }

    pub(crate) async fn figures(&self) -> Vec<QueueFigures> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Figures(reply)).await;
        rx.await.unwrap_or_default()
    }

    pub(crate) async fn agents(&self) -> Vec<AgentView> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Agents(reply)).await;
        rx.await.unwrap_or_default()
    }

    /// Every caller waiting ([`Dispatcher::waiting_callers`]).
    pub(crate) async fn waiting(&self) -> Vec<WaitingView> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Waiting(reply)).await;
        rx.await.unwrap_or_default()
    }

    /// An operator's request from the console ([`Dispatcher::agent_request`]).
    pub async fn agent_request(
        &self,
        agent: &str,
        req: AgentRequest,
    ) -> Result<(), RequestRefusal> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Request(agent.to_owned(), req, reply)).await;
        rx.await.unwrap_or(Err(RequestRefusal::UnknownAgent))
    }

    /// The operator declined the offer ringing for `caller` ([`Dispatcher::decline`]).
    pub async fn decline(&self, caller: CallerId, agent: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Decline(caller, agent.to_owned(), reply))
            .await;
        rx.await.unwrap_or(false)
    }

    /// `agent`'s state and current offer or call, as its console shows them.
    pub async fn console(&self, agent: &str) -> Option<AgentConsoleView> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Console(agent.to_owned(), reply)).await;
        rx.await.ok().flatten()
    }

    /// Every agent's state changes and offers, from now on. A receiver that falls more than
    /// a few hundred notices behind gets `Lagged` and should read [`QueueHandle::console`]
    /// again.
    pub fn notices(&self) -> broadcast::Receiver<AgentNotice> {
        self.notices.subscribe()
    }

    async fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).await.is_err() {
            debug!("queue dispatcher has stopped; command dropped");
        }
    }
}

/// Run `dispatcher` in a task on `tracker` until `cancel` (or every handle is dropped), keeping
/// no history (the unit tests).
#[cfg(test)]
pub(crate) fn spawn_dispatcher(
    dispatcher: Dispatcher,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> QueueHandle {
    spawn_dispatcher_with_history(dispatcher, History::disabled(), tracker, cancel)
}

/// Run `dispatcher` in a task on `tracker` until `cancel` (or every handle is dropped),
/// recording queue events and operators' states in `history`.
pub(crate) fn spawn_dispatcher_with_history(
    dispatcher: Dispatcher,
    history: History,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> QueueHandle {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (notices, _) = broadcast::channel(NOTICE_BUFFER);
    let mut driver = Driver::new(dispatcher, notices.clone());
    driver.history = history;
    tracker.spawn(driver.run(rx, cancel));
    QueueHandle { tx, notices }
}

fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

struct Driver {
    core: Dispatcher,
    events: HashMap<CallerId, Listener>,
    history: History,
    /// Each queued caller's Call-ID, from its entry to its last event (the call may have
    /// left the registry by the time its operator's call is reported complete).
    call_ids: HashMap<CallerId, String>,
    /// Who each caller is, for operators' consoles.
    contexts: HashMap<CallerId, Arc<CallerContext>>,
    /// The offer (or call) each agent has now, for its console.
    offers: HashMap<String, OfferView>,
    notices: broadcast::Sender<AgentNotice>,
    /// What was last announced of each agent's state.
    announced: HashMap<String, (AgentStatus, Option<String>)>,
    /// With more than one node: offers wait for the cluster's claim.
    cluster: Option<ClusterLink>,
}

/// The dispatcher's side of the cluster ([`crate::dispatch::cluster`]).
struct ClusterLink {
    tx: mpsc::Sender<ClusterCmd>,
    /// Offers waiting for the cluster's answer: agent → caller and ring timeout.
    pending: HashMap<String, (CallerId, Duration)>,
    /// Agents this node holds in the cluster (asked for; the cluster task keeps the leases).
    held: HashSet<String>,
}

impl Driver {
    fn new(core: Dispatcher, notices: broadcast::Sender<AgentNotice>) -> Self {
        Driver {
            core,
            events: HashMap::new(),
            history: History::disabled(),
            call_ids: HashMap::new(),
            contexts: HashMap::new(),
            offers: HashMap::new(),
            notices,
            announced: HashMap::new(),
            cluster: None,
        }
    }

    /// Hand what the core recorded to the history.
    fn journal(&mut self, entries: Vec<Journal>) {
        for e in entries {
            let r = match e {
                Journal::Queue {
                    at,
                    queue,
                    caller,
                    agent,
                    event,
                    wait,
                    talk,
                    position,
                } => Record::Queue(QueueEventRecord {
                    at_ms: crate::history::wall_ms(at),
                    call_id: {
                        let id = match self.call_ids.get(&caller) {
                            Some(id) => Some(id.clone()),
                            None => self.history.call_id(caller),
                        };
                        match (event, &id) {
                            (QueueEventKind::Enter, Some(id)) => {
                                self.call_ids.insert(caller, id.clone());
                            }
                            (
                                QueueEventKind::Abandon
                                | QueueEventKind::Complete
                                | QueueEventKind::CallbackUnreached,
                                _,
                            ) => {
                                self.call_ids.remove(&caller);
                            }
                            _ => {}
                        }
                        id
                    },
                    queue,
                    agent,
                    event,
                    wait_ms: wait.map(|d| d.as_millis() as i64),
                    talk_ms: talk.map(|d| d.as_millis() as i64),
                    position: position.map(|p| p as i64),
                }),
                Journal::AgentState {
                    agent,
                    state,
                    reason,
                    from,
                    to,
                } => Record::AgentState(AgentStateRecord {
                    agent,
                    state,
                    reason,
                    started_ms: crate::history::wall_ms(from),
                    ended_ms: crate::history::wall_ms(to),
                }),
            };
            self.history.record(r);
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, cancel: CancellationToken) {
        loop {
            let sweep = tokio::time::Instant::now() + SWEEP_EVERY;
            let wake = self
                .core
                .next_deadline()
                .map_or(sweep, |t| tokio::time::Instant::from_std(t).min(sweep));
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                () = tokio::time::sleep_until(wake) => {}
            }
            self.settle();
            let entries = self.core.take_journal(clock());
            self.journal(entries);
        }
        // Operators' states as they are at the stop end here.
        let entries = self.core.close_journal(clock());
        self.journal(entries);
        debug!("queue dispatcher stopped");
    }

    fn handle(&mut self, cmd: Cmd) {
        let now = clock();
        let d = &mut self.core;
        match cmd {
            Cmd::Enqueue {
                caller,
                queue,
                skill,
                priority,
                context,
                events,
                reply,
            } => {
                let r = d.enqueue(now, caller, &queue, skill.as_deref(), priority);
                if r.is_ok() {
                    self.events.insert(caller, Listener::Call(events));
                    if let Some(context) = context {
                        self.contexts.insert(caller, context);
                    }
                }
                let _ = reply.send(r);
            }
            Cmd::Rejoin {
                caller,
                queue,
                skill,
                since,
                events,
                reply,
            } => {
                let r = d.rejoin(now, caller, &queue, skill.as_deref(), since);
                if r.is_ok() {
                    self.events.insert(caller, Listener::Call(events));
                }
                let _ = reply.send(r);
            }
            Cmd::RingDirect {
                caller,
                agent,
                ring_timeout,
                reply,
            } => {
                let _ = reply.send(d.ring_direct(now, caller, &agent, ring_timeout));
            }
            Cmd::DirectAnswered(caller, agent) => d.direct_answered(now, caller, &agent),
            Cmd::Abandon(caller) => d.abandon(now, caller),
            Cmd::RequestCallback {
                caller,
                events,
                reply,
            } => {
                let ok = d.request_callback(now, caller);
                if ok {
                    self.events.insert(caller, Listener::Callback(events));
                }
                let _ = reply.send(ok);
            }
            Cmd::CallbackAnswered(caller) => d.callback_answered(now, caller),
            Cmd::Withdraw(caller, agent) => d.withdraw_offer(caller, &agent),
            Cmd::CallbackFailed(caller) => d.callback_failed(now, caller),
            Cmd::Answered(caller, agent) => d.offer_answered(now, caller, &agent),
            Cmd::Requeue(caller, agent) => {
                if !d.requeue(now, caller, &agent) {
                    debug!(caller, %agent, "requeue of a caller no longer answered; ignored");
                }
            }
            Cmd::Failed(caller, agent, why) => d.offer_failed(now, caller, &agent, why),
            Cmd::CallEnded(agent) => d.call_ended(now, &agent),
            Cmd::LoggedIn(agent) => d.agent_logged_in(now, &agent),
            Cmd::LoggedOut(agent) => d.agent_logged_out(now, &agent),
            Cmd::Pause(agent, reason, reply) => {
                let _ = reply.send(d.pause(&agent, &reason));
            }
            Cmd::Unpause(agent, reply) => {
                let _ = reply.send(d.unpause(now, &agent));
            }
            Cmd::Figures(reply) => {
                self.settle();
                let _ = reply.send(self.core.figures());
            }
            Cmd::Agents(reply) => {
                self.settle();
                let _ = reply.send(self.core.agents());
            }
            Cmd::Waiting(reply) => {
                self.settle();
                let _ = reply.send(self.core.waiting_callers());
            }
            Cmd::Request(agent, req, reply) => {
                let _ = reply.send(d.agent_request(now, &agent, req));
            }
            Cmd::Decline(caller, agent, reply) => {
                let _ = reply.send(d.decline(now, caller, &agent));
            }
            Cmd::JoinCluster(tx) => {
                self.cluster = Some(ClusterLink {
                    tx,
                    pending: HashMap::new(),
                    held: HashSet::new(),
                });
            }
            Cmd::Claimed {
                caller,
                agent,
                reply,
            } => self.claimed(now, caller, agent, reply),
            Cmd::HeldElsewhere(held) => d.set_held_elsewhere(now, &held),
            Cmd::Line(reply) => {
                let line = d
                    .line()
                    .into_iter()
                    .map(|e| {
                        let at = crate::history::wall_ms(e.since);
                        (e, at)
                    })
                    .collect();
                let _ = reply.send(line);
            }
            Cmd::Console(agent, reply) => {
                self.settle();
                let view = self
                    .core
                    .agents()
                    .into_iter()
                    .find(|a| a.id == agent)
                    .map(|a| AgentConsoleView {
                        offer: self.offers.get(&a.id).cloned(),
                        agent: a,
                    });
                let _ = reply.send(view);
            }
        }
    }

    /// Announce agents whose state changed since the last announcement, and forget offers
    /// and contexts nobody needs any more.
    fn announce(&mut self) {
        let views = self.core.agents();
        for v in &views {
            let keep = match &v.status {
                AgentStatus::Ringing { caller } | AgentStatus::OnCall { caller } => {
                    self.offers.get(&v.id).is_some_and(|o| o.caller == *caller)
                }
                _ => false,
            };
            if !keep {
                self.offers.remove(&v.id);
            }
            if let Some(link) = self.cluster.as_mut() {
                link.keep_hold(v);
            }
            let key = (v.status.clone(), v.pause_reason.clone());
            if self.announced.get(&v.id) != Some(&key) {
                self.announced.insert(v.id.clone(), key);
                // Nobody listening is fine: consoles read the state when they connect.
                let _ = self.notices.send(AgentNotice::State(v.clone()));
            }
        }
        let core = &self.core;
        let offers = &self.offers;
        self.contexts.retain(|caller, _| {
            core.waiting_idx(*caller).is_some() || offers.values().any(|o| o.caller == *caller)
        });
    }

    /// Note an offer for the agent's console.
    fn offered(&mut self, now: Instant, caller: CallerId, agent: &str) {
        let Some((queue, since, callback)) = self.core.waiting_info(caller) else {
            return;
        };
        let offer = OfferView {
            agent: agent.to_owned(),
            caller,
            queue,
            waited_seconds: now.saturating_duration_since(since).as_secs(),
            callback,
            context: self.contexts.get(&caller).cloned(),
        };
        self.offers.insert(agent.to_owned(), offer.clone());
        // The state (ringing) is announced after this, by `announce`.
        let _ = self.notices.send(AgentNotice::Offer(offer));
    }

    /// Abandon callers whose call is gone, poll and deliver until nothing changes.
    fn settle(&mut self) {
        let now = clock();
        let gone: Vec<CallerId> = self
            .events
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(c, _)| *c)
            .collect();
        for caller in gone {
            debug!(caller, "queued call went away");
            self.events.remove(&caller);
            self.core.abandon(now, caller);
        }
        // Each extra round follows an abandon, which removes a registration: this ends.
        loop {
            let mut again = false;
            for action in self.core.poll(now) {
                again |= self.deliver(now, action);
            }
            if !again {
                break;
            }
        }
        let core = &self.core;
        self.events.retain(|caller, _| core.holds(*caller));
        self.announce();
    }

    /// Hand one action to its caller; `true` if the caller turned out to be gone. In a
    /// cluster an offer first goes to the cluster for a claim ([`Driver::claimed`]).
    fn deliver(&mut self, now: Instant, action: Action) -> bool {
        if let (
            Action::Offer {
                caller,
                agent,
                ring_timeout,
            },
            Some(link),
        ) = (&action, self.cluster.as_mut())
        {
            let entry = self.core.line_entry(*caller);
            let takes = self.core.takes_of(agent);
            if let (Some(entry), Some(takes)) = (entry, takes) {
                let arrived_ms = crate::history::wall_ms(entry.since);
                let claim = ClusterCmd::Claim {
                    caller: *caller,
                    agent: agent.clone(),
                    entry,
                    arrived_ms,
                    takes,
                };
                link.pending.insert(agent.clone(), (*caller, *ring_timeout));
                if link.tx.try_send(claim).is_ok() {
                    return false;
                }
                // The cluster task is gone or swamped: ring as a single node would.
                link.pending.remove(agent);
                warn!(%agent, "cluster unavailable; offering without a claim");
            }
        }
        self.deliver_now(now, action)
    }

    /// The cluster answered a claim: ring the agent, or leave the caller to the next agent.
    fn claimed(&mut self, now: Instant, caller: CallerId, agent: String, reply: ClaimReply) {
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        let ring_timeout = match link.pending.get(&agent) {
            Some((c, t)) if *c == caller => *t,
            _ => return,
        };
        link.pending.remove(&agent);
        match reply {
            ClaimReply::Granted | ClaimReply::Unavailable => {
                if reply == ClaimReply::Granted {
                    link.held.insert(agent.clone());
                }
                // An offer cancelled meanwhile is not rung; `announce` lets the hold go.
                if self.core.is_ringing_for(&agent, caller) {
                    let offer = Action::Offer {
                        caller,
                        agent,
                        ring_timeout,
                    };
                    self.deliver_now(now, offer);
                }
            }
            ClaimReply::Refused { retry_after } => {
                debug!(caller, %agent, "another node has the agent or an earlier caller");
                self.core.claim_refused(now, caller, &agent, retry_after);
            }
        }
    }

    /// [`Driver::deliver`] without the cluster.
    fn deliver_now(&mut self, now: Instant, action: Action) -> bool {
        let caller = action.caller();
        if let Action::Offer { agent, .. } = &action {
            if self.events.contains_key(&caller) {
                self.offered(now, caller, agent);
            }
        }
        let Some(tx) = self.events.get(&caller) else {
            return false;
        };
        let q = CallbackEvent::Queue;
        let (event, offered) = match action {
            Action::Offer {
                agent,
                ring_timeout,
                ..
            } => (
                q(QueueEvent::Offer {
                    agent: agent.clone(),
                    ring_timeout,
                }),
                Some(agent),
            ),
            Action::CancelOffer { agent, .. } => (q(QueueEvent::CancelOffer { agent }), None),
            Action::Announce { position, .. } => (q(QueueEvent::Announce(position)), None),
            Action::MaxWait { .. } => (q(QueueEvent::MaxWait), None),
            Action::DialBack {
                attempt,
                ring_timeout,
                ..
            } => (
                CallbackEvent::DialBack {
                    attempt,
                    ring_timeout,
                },
                None,
            ),
            Action::CallbackUnreached { .. } => (CallbackEvent::Unreached, None),
        };
        let dial = matches!(event, CallbackEvent::DialBack { .. });
        match tx.try_send(event) {
            Ok(()) => false,
            Err(true) => {
                self.events.remove(&caller);
                self.core.abandon(now, caller);
                true
            }
            Err(false) => {
                if dial {
                    // Nobody will dial: count it as an unanswered attempt.
                    self.core.callback_failed(now, caller);
                }
                warn!(
                    caller,
                    "queued call is not reading its events; event dropped"
                );
                if let Some(agent) = offered {
                    self.core.withdraw_offer(caller, &agent);
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a cluster: an agent another node holds is not offered; a refused claim withdraws
    /// the offer at no cost, the caller keeps its place and goes to the next agent, and the
    /// refused agent comes back after the wait; the line shows waiting callers only.
    #[test]
    fn agents_held_by_another_node_are_not_offered_and_a_refused_claim_costs_nothing() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &["es"], 1)],
            &[QueueConfig {
                name: "general".into(),
                members: Some(vec!["a".into()]),
                ..QueueConfig::default()
            }],
        );
        t.login(0.0, &["a", "b"]);
        t.d.set_held_elsewhere(t.t(0.0), &HashSet::from(["a".to_owned()]));
        t.enqueue(1.0, 7, None);
        assert!(
            t.poll(1.0).is_empty(),
            "a is held elsewhere, b is no member"
        );
        assert!(t.d.agents()[0].busy_elsewhere);
        assert_eq!(
            t.d.ring_direct(t.t(1.0), 99, "a", Duration::from_secs(5)),
            Err("busy_elsewhere")
        );
        let line = t.d.line();
        assert_eq!(line.len(), 1);
        assert_eq!((line[0].caller, line[0].queue.as_str()), (7, "general"));
        let takes = t.d.takes_of("a").unwrap();
        assert!(takes.could_take("general", None) && takes.could_take("other", Some("fr")));
        assert!(!t.d.takes_of("b").unwrap().could_take("general", None));
        assert!(t.d.takes_of("b").unwrap().could_take("other", Some("ES")));
        assert!(!t.d.takes_of("b").unwrap().could_take("other", Some("fr")));

        t.d.set_held_elsewhere(t.t(2.0), &HashSet::new());
        let offers = t.poll(2.0);
        assert!(
            matches!(offers.as_slice(), [Action::Offer { caller: 7, agent, .. }] if agent == "a"),
            "{offers:?}"
        );
        assert!(
            t.d.line().is_empty(),
            "a caller whose agent rings is not in the line"
        );
        t.d.claim_refused(t.t(2.1), 7, "a", Duration::from_secs(1));
        assert_eq!(t.status("a"), AgentStatus::Available, "no no-answer pause");
        assert!(t.poll(2.5).is_empty(), "not offered again before the wait");
        assert_eq!(t.d.next_deadline(), Some(t.t(3.1)));
        let offers = t.poll(3.1);
        assert!(
            matches!(offers.as_slice(), [Action::Offer { caller: 7, .. }]),
            "{offers:?}"
        );
        assert_eq!(t.d.position(7).map(|p| p.place), Some(1));
    }

    /// The journal: queue events as `queue_log` has them, and each state an operator left
    /// as a span, on virtual time.
    #[test]
    fn the_journal_has_queue_events_and_operators_state_spans() {
        let mut t = T::new(
            &[agent("1001", &[], 1)],
            &[QueueConfig {
                name: "general".into(),
                wrap_up_seconds: 10,
                ..QueueConfig::default()
            }],
        );
        let mut j = Vec::new();
        t.login(0.0, &["1001"]);
        assert!(t.d.take_journal(t.t(0.0)).is_empty(), "nothing left yet");
        t.enqueue(5.0, 7, None);
        t.poll(5.0);
        j.extend(t.d.take_journal(t.t(5.0)));
        t.answer(12.0, 7, "1001");
        j.extend(t.d.take_journal(t.t(12.0)));
        t.enqueue(13.0, 8, None);
        t.d.abandon(t.t(20.0), 8);
        t.end(72.0, "1001");
        j.extend(t.d.take_journal(t.t(72.0)));
        t.poll(82.0);
        j.extend(t.d.take_journal(t.t(82.0)));
        let queue: Vec<(QueueEventKind, CallerId, Option<Duration>, Option<Duration>)> = j
            .iter()
            .filter_map(|e| match e {
                Journal::Queue {
                    event,
                    caller,
                    wait,
                    talk,
                    ..
                } => Some((*event, *caller, *wait, *talk)),
                _ => None,
            })
            .collect();
        let s = Duration::from_secs;
        assert_eq!(
            queue,
            vec![
                (QueueEventKind::Enter, 7, None, None),
                (QueueEventKind::Offer, 7, None, None),
                (QueueEventKind::Answer, 7, Some(s(7)), None),
                (QueueEventKind::Enter, 8, None, None),
                (QueueEventKind::Abandon, 8, Some(s(7)), None),
                (QueueEventKind::Complete, 7, None, Some(s(60))),
            ]
        );
        let spans: Vec<(&str, Instant, Instant)> = j
            .iter()
            .filter_map(|e| match e {
                Journal::AgentState {
                    state, from, to, ..
                } => Some((*state, *from, *to)),
                _ => None,
            })
            .collect();
        assert_eq!(
            spans,
            vec![
                ("available", t.t(0.0), t.t(5.0)),
                ("ringing", t.t(5.0), t.t(12.0)),
                ("on_call", t.t(12.0), t.t(72.0)),
                ("wrap_up", t.t(72.0), t.t(82.0)),
            ]
        );
        t.d.pause("1001", "lunch");
        assert_eq!(
            t.d.take_journal(t.t(90.0)),
            vec![Journal::AgentState {
                agent: "1001".into(),
                state: "available",
                reason: None,
                from: t.t(82.0),
                to: t.t(90.0),
            }]
        );
        let closed = t.d.close_journal(t.t(100.0));
        assert_eq!(
            closed,
            vec![Journal::AgentState {
                agent: "1001".into(),
                state: "paused",
                reason: Some("lunch".into()),
                from: t.t(90.0),
                to: t.t(100.0),
            }]
        );
    }

    #[test]
    fn a_caller_sent_back_by_an_operator_rejoins_at_the_front_with_their_wait() {
        let mut t = T::new(
            &[agent("1001", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["1001"]);
        t.d.pause("1001", "lunch");
        t.enqueue(10.0, 1, None);
        t.enqueue(20.0, 2, None);
        // Caller 9 first joined at 5 s, talked to an operator, and comes back at 100 s.
        let p =
            t.d.rejoin(t.t(100.0), 9, "general", None, t.t(5.0))
                .unwrap();
        assert_eq!(p.place, 1, "at the front");
        assert_eq!(t.d.position(1).unwrap().place, 2);
        assert_eq!(
            t.figures().longest_wait,
            Duration::from_secs(95),
            "its wait kept"
        );
        t.d.unpause(t.t(101.0), "1001");
        assert_eq!(offers(&t.poll(101.0)), vec![(9, "1001")]);
        // Refused as any caller is when nobody could take it.
        let mut t = T::new(
            &[agent("1001", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        assert_eq!(
            t.d.rejoin(t.t(1.0), 9, "general", None, t.t(0.0)),
            Err(Refusal::NoAgents)
        );
    }

    #[test]
    fn an_agent_rung_directly_for_a_transfer_is_busy_until_the_call_ends() {
        let mut t = T::new(
            &[agent("1001", &[], 1), agent("1002", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["1001", "1002"]);
        t.enqueue(1.0, 7, None);
        let first = offers(&t.poll(1.0))[0].1.to_owned();
        t.answer(2.0, 7, &first);
        let other = if first == "1001" { "1002" } else { "1001" };
        // The operator transfers caller 7 to the other agent.
        assert_eq!(
            t.d.ring_direct(t.t(3.0), 7, &first, Duration::from_secs(20)),
            Err("on_call")
        );
        t.d.ring_direct(t.t(3.0), 7, other, Duration::from_secs(20))
            .unwrap();
        assert_eq!(t.status(other), AgentStatus::Ringing { caller: 7 });
        // A new caller is not offered to the ringing agent.
        t.enqueue(4.0, 8, None);
        assert!(offers(&t.poll(4.0)).is_empty());
        t.d.abandon(t.t(4.5), 8);
        t.d.direct_answered(t.t(5.0), 7, other);
        assert_eq!(t.status(other), AgentStatus::OnCall { caller: 7 });
        t.end(6.0, &first);
        assert!(matches!(t.status(&first), AgentStatus::WrapUp { .. }));
        t.end(60.0, other);
        assert!(matches!(t.status(other), AgentStatus::WrapUp { .. }));
        // A direct ring nobody reports on is given up, as a queue offer is.
        t.poll(100.0);
        t.d.ring_direct(t.t(100.0), 10, other, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}"));
        let a = t.poll(125.1);
        assert!(cancels(&a).contains(&(10, other)), "{a:?}");
    }

    #[test]
    fn operator_phone_answers_map_to_offer_failures() {
        assert_eq!(OfferFailure::from_status(486), OfferFailure::Busy);
        assert_eq!(OfferFailure::from_status(603), OfferFailure::Rejected);
        assert_eq!(OfferFailure::from_status(488), OfferFailure::NoCommonCodec);
        assert_eq!(OfferFailure::from_status(408), OfferFailure::NoAnswer);
        assert_eq!(OfferFailure::from_status(503), OfferFailure::Unreachable);
    }

    fn agent(id: &str, skills: &[&str], tier: u32) -> AgentConfig {
        AgentConfig {
            id: id.into(),
            password: "pw".into(),
            skills: skills.iter().map(|s| s.to_string()).collect(),
            tier,
            name: None,
            role: Default::default(),
        }
    }

    fn queue(name: &str, strategy: Strategy) -> QueueConfig {
        QueueConfig {
            name: name.into(),
            strategy,
            ..QueueConfig::default()
        }
    }

    /// A dispatcher on virtual time: `t(s)` is `s` seconds after one base instant.
    struct T {
        d: Dispatcher,
        base: Instant,
    }

    impl T {
        fn new(agents: &[AgentConfig], queues: &[QueueConfig]) -> Self {
            T {
                d: Dispatcher::new(agents, queues),
                base: Instant::now(),
            }
        }

        fn t(&self, s: f64) -> Instant {
            self.base + Duration::from_secs_f64(s)
        }

        fn login(&mut self, s: f64, ids: &[&str]) {
            for id in ids {
                self.d.agent_logged_in(self.t(s), id);
            }
        }

        fn enqueue(&mut self, s: f64, caller: CallerId, skill: Option<&str>) -> Position {
            self.d
                .enqueue(self.t(s), caller, "general", skill, 0)
                .unwrap()
        }

        fn poll(&mut self, s: f64) -> Vec<Action> {
            self.d.poll(self.t(s))
        }

        fn answer(&mut self, s: f64, caller: CallerId, agent: &str) {
            self.d.offer_answered(self.t(s), caller, agent);
        }

        fn end(&mut self, s: f64, agent: &str) {
            self.d.call_ended(self.t(s), agent);
        }

        fn status(&self, id: &str) -> AgentStatus {
            self.d
                .agents()
                .into_iter()
                .find(|a| a.id == id)
                .unwrap()
                .status
        }

        fn figures(&self) -> QueueFigures {
            self.d
                .figures()
                .into_iter()
                .find(|f| f.name == "general")
                .unwrap()
        }
    }

    fn offers(actions: &[Action]) -> Vec<(CallerId, &str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Offer { caller, agent, .. } => Some((*caller, agent.as_str())),
                _ => None,
            })
            .collect()
    }

    fn cancels(actions: &[Action]) -> Vec<(CallerId, &str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::CancelOffer { caller, agent } => Some((*caller, agent.as_str())),
                _ => None,
            })
            .collect()
    }

    fn abc(strategy: Strategy) -> T {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1), agent("c", &[], 1)],
            &[QueueConfig {
                wrap_up_seconds: 0,
                ..queue("general", strategy)
            }],
        );
        t.login(0.0, &["a", "b", "c"]);
        t
    }

    /// Enqueue, offer, answer and end a call at `s`; returns the agent that got it.
    fn one_call(t: &mut T, s: f64, caller: CallerId) -> String {
        t.enqueue(s, caller, None);
        let acts = t.poll(s);
        let o = offers(&acts);
        assert_eq!(o.len(), 1, "{acts:?}");
        let agent = o[0].1.to_owned();
        t.answer(s, caller, &agent);
        t.end(s + 1.0, &agent);
        t.poll(s + 1.0);
        agent
    }

    #[test]
    fn longest_idle_offers_the_agent_idle_longest() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1), agent("c", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(10.0, &["a"]);
        t.login(20.0, &["b"]);
        t.login(5.0, &["c"]);
        t.enqueue(30.0, 1, None);
        assert_eq!(offers(&t.poll(30.0)), [(1, "c")]);
        t.answer(31.0, 1, "c");
        t.end(60.0, "c");
        // c has just finished a call: a (idle since 10) then b (20) are next.
        t.enqueue(80.0, 2, None);
        assert_eq!(offers(&t.poll(80.0)), [(2, "a")]);
        t.enqueue(81.0, 3, None);
        assert_eq!(offers(&t.poll(81.0)), [(3, "b")]);
    }

    #[test]
    fn longest_idle_ties_go_to_config_order_every_time() {
        for _ in 0..3 {
            let mut t = abc(Strategy::LongestIdle);
            t.enqueue(1.0, 1, None);
            t.enqueue(1.0, 2, None);
            assert_eq!(offers(&t.poll(1.0)), [(1, "a"), (2, "b")]);
        }
    }

    #[test]
    fn round_robin_rotates_from_the_last_offered() {
        let mut t = abc(Strategy::RoundRobin);
        // Every agent is free each time (no wrap-up), yet the pointer moves on.
        let got: Vec<String> = (1..=5)
            .map(|c| one_call(&mut t, c as f64 * 10.0, c))
            .collect();
        assert_eq!(got, ["a", "b", "c", "a", "b"]);
        // Busy agents are skipped, and the pointer still remembers the last one offered.
        t.d.pause("c", "lunch");
        assert_eq!(one_call(&mut t, 100.0, 6), "a");
        assert_eq!(one_call(&mut t, 110.0, 7), "b");
        t.d.unpause(t.t(115.0), "c");
        assert_eq!(one_call(&mut t, 120.0, 8), "c");
    }

    #[test]
    fn fewest_calls_offers_the_agent_with_fewest_answered() {
        let mut t = abc(Strategy::FewestCalls);
        // All at 0: config order.
        assert_eq!(one_call(&mut t, 10.0, 1), "a");
        assert_eq!(one_call(&mut t, 20.0, 2), "b");
        assert_eq!(one_call(&mut t, 30.0, 3), "c");
        assert_eq!(one_call(&mut t, 40.0, 4), "a");
        // a: 2, b: 1, c: 1 -> b (config order among the 1s).
        assert_eq!(one_call(&mut t, 50.0, 5), "b");
        let taken: Vec<u64> = t.d.agents().iter().map(|a| a.calls_taken).collect();
        assert_eq!(taken, [2, 2, 1]);
        // A failed offer is not a call taken.
        t.enqueue(60.0, 6, None);
        assert_eq!(offers(&t.poll(60.0)), [(6, "c")]);
        t.d.offer_failed(t.t(61.0), 6, "c", OfferFailure::NoAnswer);
        assert_eq!(offers(&t.poll(61.0)), [(6, "a")]);
        assert_eq!(t.d.agents()[2].calls_taken, 1);
    }

    #[test]
    fn ring_all_rings_everyone_and_the_first_answer_wins() {
        let mut t = abc(Strategy::RingAll);
        t.d.pause("b", "training");
        t.enqueue(1.0, 7, None);
        let acts = t.poll(1.0);
        assert_eq!(offers(&acts), [(7, "a"), (7, "c")]);
        // Nothing else for this caller while it rings.
        assert!(offers(&t.poll(2.0)).is_empty());
        t.answer(5.0, 7, "c");
        let acts = t.poll(5.0);
        assert_eq!(cancels(&acts), [(7, "a")]);
        assert_eq!(t.status("c"), AgentStatus::OnCall { caller: 7 });
        assert_eq!(t.status("a"), AgentStatus::Available);
        // A late answer from the loser changes nothing.
        t.answer(6.0, 7, "a");
        assert_eq!(t.status("a"), AgentStatus::Available);
        assert_eq!(t.figures().answered, 1);
    }

    #[test]
    fn ring_all_failures_pause_only_that_agent() {
        let mut t = abc(Strategy::RingAll);
        t.enqueue(1.0, 7, None);
        assert_eq!(offers(&t.poll(1.0)).len(), 3);
        t.d.offer_failed(t.t(2.0), 7, "b", OfferFailure::Rejected);
        assert!(t.poll(2.0).is_empty());
        assert!(matches!(t.status("b"), AgentStatus::NoAnswerPause { .. }));
        t.d.abandon(t.t(3.0), 7);
        assert_eq!(cancels(&t.poll(3.0)), [(7, "a"), (7, "c")]);
        assert_eq!(t.status("a"), AgentStatus::Available);
    }

    #[test]
    fn lower_tiers_are_offered_first() {
        let mut t = T::new(
            &[
                agent("backup", &[], 2),
                agent("x", &[], 1),
                agent("y", &[], 1),
            ],
            &[queue("general", Strategy::LongestIdle)],
        );
        // backup has been idle longest, but tier 1 comes first.
        t.login(0.0, &["backup"]);
        t.login(5.0, &["x", "y"]);
        t.enqueue(10.0, 1, None);
        t.enqueue(10.0, 2, None);
        t.enqueue(10.0, 3, None);
        assert_eq!(offers(&t.poll(10.0)), [(1, "x"), (2, "y"), (3, "backup")]);
    }

    #[test]
    fn ring_all_rings_only_the_best_tier() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 2), agent("c", &[], 1)],
            &[queue("general", Strategy::RingAll)],
        );
        t.login(0.0, &["a", "b", "c"]);
        t.enqueue(1.0, 1, None);
        assert_eq!(offers(&t.poll(1.0)), [(1, "a"), (1, "c")]);
    }

    #[test]
    fn skills_route_languages() {
        let mut t = T::new(
            &[
                agent("en", &["en"], 1),
                agent("es", &["ES"], 1),
                agent("any", &[], 1),
            ],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["en", "es"]);
        t.enqueue(1.0, 1, Some("es"));
        t.enqueue(1.0, 2, Some("en"));
        assert_eq!(offers(&t.poll(1.0)), [(1, "es"), (2, "en")]);
        // Nobody logged in speaks French, but an agent with no skills takes anything.
        assert_eq!(
            t.d.enqueue(t.t(2.0), 3, "general", Some("fr"), 0),
            Err(Refusal::NoAgents)
        );
        t.login(3.0, &["any"]);
        t.enqueue(4.0, 3, Some("fr"));
        assert_eq!(offers(&t.poll(4.0)), [(3, "any")]);
    }

    #[test]
    fn a_caller_nobody_free_can_take_does_not_block_the_line() {
        let mut t = T::new(
            &[agent("es", &["es"], 1), agent("en", &["en"], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["es", "en"]);
        t.d.pause("es", "break");
        t.enqueue(1.0, 1, Some("es"));
        t.enqueue(2.0, 2, Some("en"));
        assert_eq!(offers(&t.poll(2.0)), [(2, "en")]);
        assert_eq!(t.d.position(1).unwrap().place, 1);
        t.d.unpause(t.t(3.0), "es");
        assert_eq!(offers(&t.poll(3.0)), [(1, "es")]);
    }

    #[test]
    fn no_offer_during_wrap_up_then_offered_after() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[QueueConfig {
                wrap_up_seconds: 15,
                ..queue("general", Strategy::LongestIdle)
            }],
        );
        t.login(0.0, &["a"]);
        t.enqueue(1.0, 1, None);
        t.poll(1.0);
        t.answer(2.0, 1, "a");
        t.end(100.0, "a");
        assert_eq!(t.status("a"), AgentStatus::WrapUp { until: t.t(115.0) });
        t.enqueue(101.0, 2, None);
        assert!(offers(&t.poll(101.0)).is_empty());
        assert_eq!(t.d.next_deadline(), Some(t.t(115.0)));
        assert!(offers(&t.poll(114.9)).is_empty());
        assert_eq!(offers(&t.poll(115.0)), [(2, "a")]);
    }

    #[test]
    fn no_answer_pauses_the_agent_and_the_next_is_offered() {
        let mut t = abc(Strategy::LongestIdle);
        t.enqueue(1.0, 1, None);
        t.enqueue(1.0, 2, None);
        assert_eq!(offers(&t.poll(1.0)), [(1, "a"), (2, "b")]);
        t.d.offer_failed(t.t(21.0), 1, "a", OfferFailure::NoAnswer);
        assert_eq!(
            t.status("a"),
            AgentStatus::NoAnswerPause { until: t.t(51.0) }
        );
        // The caller kept its place at the head and goes to c at once.
        assert_eq!(t.d.position(1).unwrap().place, 1);
        assert_eq!(offers(&t.poll(21.0)), [(1, "c")]);
        t.answer(22.0, 1, "c");
        t.answer(22.0, 2, "b");
        // a is back after the pause.
        t.enqueue(30.0, 3, None);
        assert!(offers(&t.poll(50.0)).is_empty());
        assert_eq!(offers(&t.poll(51.0)), [(3, "a")]);
    }

    #[test]
    fn busy_likewise_and_the_caller_keeps_its_place() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        t.enqueue(1.0, 1, None);
        t.enqueue(2.0, 2, None);
        assert_eq!(offers(&t.poll(2.0)), [(1, "a")]);
        t.d.offer_failed(t.t(3.0), 1, "a", OfferFailure::Busy);
        assert!(matches!(t.status("a"), AgentStatus::NoAnswerPause { .. }));
        assert!(offers(&t.poll(3.0)).is_empty());
        t.login(4.0, &["b"]);
        // Caller 1 is still first in line, ahead of 2.
        assert_eq!(t.d.position(1).unwrap().place, 1);
        assert_eq!(t.d.position(2).unwrap().place, 2);
        assert_eq!(offers(&t.poll(4.0)), [(1, "b")]);
        // Other failures behave the same.
        for why in [
            OfferFailure::Rejected,
            OfferFailure::Unreachable,
            OfferFailure::NoCommonCodec,
        ] {
            t.d.offer_failed(t.t(5.0), 1, "b", why);
            assert!(matches!(t.status("b"), AgentStatus::NoAnswerPause { .. }));
            t.d.unpause(t.t(5.0), "b");
            assert_eq!(offers(&t.poll(5.0)), [(1, "b")]);
        }
    }

    #[test]
    fn abandon_while_waiting() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        t.d.pause("a", "x");
        t.enqueue(1.0, 1, None);
        t.enqueue(2.0, 2, None);
        t.d.abandon(t.t(10.0), 1);
        assert!(t.poll(10.0).is_empty());
        assert_eq!(t.d.position(1), None);
        assert_eq!(t.d.position(2).unwrap().place, 1);
        let f = t.figures();
        assert_eq!((f.abandoned, f.abandoned_within_30s, f.waiting), (1, 1, 1));
        // Unknown callers are ignored.
        t.d.abandon(t.t(11.0), 99);
        assert_eq!(t.figures().abandoned, 1);
    }

    #[test]
    fn abandon_while_ringing_cancels_the_offer_without_penalty() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        t.enqueue(1.0, 1, None);
        t.enqueue(2.0, 2, None);
        assert_eq!(offers(&t.poll(2.0)), [(1, "a")]);
        t.d.abandon(t.t(5.0), 1);
        let acts = t.poll(5.0);
        assert_eq!(cancels(&acts), [(1, "a")]);
        assert_eq!(offers(&acts), [(2, "a")]);
        // A failure report arriving after the cancel is ignored.
        t.d.offer_failed(t.t(6.0), 1, "a", OfferFailure::NoAnswer);
        assert_eq!(t.status("a"), AgentStatus::Ringing { caller: 2 });
    }

    #[test]
    fn abandon_after_answer_ends_the_agents_call() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        t.enqueue(1.0, 1, None);
        t.poll(1.0);
        t.answer(2.0, 1, "a");
        t.d.abandon(t.t(62.0), 1);
        assert!(matches!(t.status("a"), AgentStatus::WrapUp { .. }));
        let f = t.figures();
        assert_eq!((f.answered, f.abandoned), (1, 0));
        // 60 s talk + 10 s wrap-up.
        assert_eq!(f.average_handle_time, Duration::from_secs(70));
        // A late call_ended changes nothing.
        t.end(63.0, "a");
        assert!(matches!(t.status("a"), AgentStatus::WrapUp { until } if until == t.t(72.0)));
    }

    #[test]
    fn max_wait_fires_once_at_the_right_time_and_the_caller_stays() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[QueueConfig {
                max_wait_seconds: 600,
                announce_every_seconds: 0,
                ..queue("general", Strategy::LongestIdle)
            }],
        );
        t.login(0.0, &["a"]);
        t.d.pause("a", "x");
        t.enqueue(100.0, 1, None);
        assert_eq!(t.d.next_deadline(), Some(t.t(700.0)));
        assert!(t.poll(699.9).is_empty());
        assert_eq!(t.poll(700.0), [Action::MaxWait { caller: 1 }]);
        assert!(t.poll(800.0).is_empty());
        assert_eq!(t.d.next_deadline(), None);
        assert_eq!(t.d.position(1).unwrap().place, 1);
        assert_eq!(t.figures().max_wait_reached, 1);
        // Still offered if an agent frees up.
        t.d.unpause(t.t(801.0), "a");
        assert_eq!(offers(&t.poll(801.0)), [(1, "a")]);
    }

    #[test]
    fn max_wait_waits_for_a_ringing_offer() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[QueueConfig {
                max_wait_seconds: 30,
                announce_every_seconds: 0,
                ..queue("general", Strategy::LongestIdle)
            }],
        );
        t.login(0.0, &["a"]);
        t.enqueue(0.0, 1, None);
        assert_eq!(offers(&t.poll(20.0)), [(1, "a")]);
        assert!(t.poll(30.0).is_empty());
        t.d.offer_failed(t.t(40.0), 1, "a", OfferFailure::NoAnswer);
        assert_eq!(t.poll(40.0), [Action::MaxWait { caller: 1 }]);
    }

    #[test]
    fn everyone_who_could_take_a_caller_logging_out_sends_max_wait_at_once() {
        let mut t = T::new(
            &[agent("es", &["es"], 1), agent("en", &["en"], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["es", "en"]);
        t.d.pause("es", "x");
        t.d.pause("en", "x");
        t.enqueue(1.0, 1, Some("es"));
        t.enqueue(1.0, 2, Some("en"));
        t.d.agent_logged_out(t.t(5.0), "es");
        assert_eq!(t.poll(5.0), [Action::MaxWait { caller: 1 }]);
        assert!(t.poll(6.0).is_empty());
    }

    #[test]
    fn announcements_come_every_period_not_at_enqueue_and_not_while_ringing() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[QueueConfig {
                announce_every_seconds: 60,
                ..queue("general", Strategy::LongestIdle)
            }],
        );
        t.login(0.0, &["a"]);
        t.d.pause("a", "x");
        let p = t.enqueue(0.0, 1, None);
        assert_eq!(p.place, 1);
        assert!(t.poll(0.0).is_empty());
        assert_eq!(t.d.next_deadline(), Some(t.t(60.0)));
        assert!(t.poll(59.0).is_empty());
        let pos = t.d.position(1).unwrap();
        assert_eq!(
            t.poll(60.0),
            [Action::Announce {
                caller: 1,
                position: pos
            }]
        );
        assert_eq!(t.d.next_deadline(), Some(t.t(120.0)));
        // At 120 an agent is ringing for the caller: no announcement, the next is at 180.
        t.d.unpause(t.t(110.0), "a");
        assert_eq!(offers(&t.poll(110.0)), [(1, "a")]);
        assert!(t.poll(120.0).is_empty());
        t.d.offer_failed(t.t(130.0), 1, "a", OfferFailure::NoAnswer);
        assert!(t.d.pause("a", "x"));
        assert!(t.poll(130.0).is_empty());
        assert!(matches!(
            t.poll(180.0)[..],
            [Action::Announce { caller: 1, .. }]
        ));
    }

    #[test]
    fn priority_jumps_the_line() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        t.d.pause("a", "x");
        t.d.enqueue(t.t(1.0), 1, "general", None, 0).unwrap();
        t.d.enqueue(t.t(2.0), 2, "general", None, 0).unwrap();
        let p = t.d.enqueue(t.t(3.0), 3, "general", None, 5).unwrap();
        assert_eq!(p.place, 1);
        assert_eq!(t.d.position(1).unwrap().place, 2);
        assert_eq!(t.d.position(2).unwrap().place, 3);
        // Same priority: arrival order.
        let p = t.d.enqueue(t.t(4.0), 4, "general", None, 5).unwrap();
        assert_eq!(p.place, 2);
        t.d.unpause(t.t(5.0), "a");
        assert_eq!(offers(&t.poll(5.0)), [(3, "a")]);
    }

    /// A queue with `members` is served by them alone; a queue without is served by every
    /// agent; an agent may serve several queues.
    #[test]
    fn queue_members_take_their_queues_callers_and_nobody_elses() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1), agent("c", &[], 1)],
            &[
                queue("general", Strategy::LongestIdle),
                QueueConfig {
                    members: Some(vec!["b".into(), "c".into()]),
                    ..queue("permits", Strategy::LongestIdle)
                },
            ],
        );
        // a has been idle longest, but is not a member of permits.
        t.login(0.0, &["a"]);
        t.login(5.0, &["b"]);
        t.login(6.0, &["c"]);
        t.d.enqueue(t.t(10.0), 1, "permits", None, 0).unwrap();
        assert_eq!(offers(&t.poll(10.0)), [(1, "b")]);
        // The general queue takes anyone: a.
        t.enqueue(11.0, 2, None);
        assert_eq!(offers(&t.poll(11.0)), [(2, "a")]);
        // Only c is left free; a permits caller gets c, a general caller would too.
        t.d.enqueue(t.t(12.0), 3, "permits", None, 0).unwrap();
        assert_eq!(offers(&t.poll(12.0)), [(3, "c")]);

        let permits = |t: &T| {
            t.d.figures()
                .into_iter()
                .find(|f| f.name == "permits")
                .unwrap()
        };
        assert_eq!(
            permits(&t).agents.ringing,
            2,
            "the queue counts its members"
        );
        assert_eq!(t.figures().agents.ringing, 3, "general counts everyone");
    }

    #[test]
    fn a_queue_whose_members_are_logged_out_refuses_and_strands_its_callers() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1)],
            &[QueueConfig {
                members: Some(vec!["b".into()]),
                ..queue("permits", Strategy::LongestIdle)
            }],
        );
        t.login(0.0, &["a"]);
        // a is logged in, but is no member: nobody can take a permits caller.
        assert_eq!(
            t.d.enqueue(t.t(1.0), 1, "permits", None, 0),
            Err(Refusal::NoAgents)
        );
        t.login(2.0, &["b"]);
        t.d.pause("b", "lunch");
        let p = t.d.enqueue(t.t(3.0), 1, "permits", None, 0).unwrap();
        assert_eq!(p.place, 1);
        assert!(offers(&t.poll(3.0)).is_empty(), "a is free but no member");
        // The last member logs out: the caller is told at once, not held for nothing.
        t.d.agent_logged_out(t.t(4.0), "b");
        let acts = t.poll(4.0);
        assert!(acts.contains(&Action::MaxWait { caller: 1 }), "{acts:?}");
    }

    /// The estimated wait counts the members who could take the caller, not every agent.
    #[test]
    fn estimated_wait_counts_the_queues_members() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1)],
            &[QueueConfig {
                members: Some(vec!["b".into()]),
                ..queue("permits", Strategy::LongestIdle)
            }],
        );
        t.login(0.0, &["a", "b"]);
        t.d.enqueue(t.t(1.0), 1, "permits", None, 0).unwrap();
        assert_eq!(offers(&t.poll(1.0)), [(1, "b")]);
        // b is ringing; a is free but no member: the next caller waits one handle time.
        let p = t.d.enqueue(t.t(2.0), 2, "permits", None, 0).unwrap();
        assert_eq!(p.place, 2);
        assert_eq!(p.ewt, DEFAULT_AHT * 2);
    }

    #[test]
    fn refused_at_once_without_agents() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        assert_eq!(
            t.d.enqueue(t.t(0.0), 1, "general", None, 0),
            Err(Refusal::NoAgents)
        );
        // Logged in but busy or paused still counts: the caller can wait.
        t.login(1.0, &["a"]);
        t.d.pause("a", "lunch");
        assert!(t.d.enqueue(t.t(2.0), 1, "general", None, 0).is_ok());
        t.d.agent_logged_out(t.t(3.0), "a");
        assert_eq!(
            t.d.enqueue(t.t(4.0), 2, "general", None, 0),
            Err(Refusal::NoAgents)
        );
        assert_eq!(t.figures().refused, 2);
        // No agents configured at all.
        let mut d = Dispatcher::new(&[], &[]);
        assert_eq!(
            d.enqueue(t.t(0.0), 1, "general", None, 0),
            Err(Refusal::NoAgents)
        );
    }

    #[test]
    fn queue_full_at_max_length() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[
                QueueConfig {
                    max_length: 2,
                    ..queue("general", Strategy::LongestIdle)
                },
                queue("other", Strategy::LongestIdle),
            ],
        );
        t.login(0.0, &["a"]);
        t.d.pause("a", "x");
        t.enqueue(1.0, 1, None);
        t.enqueue(1.0, 2, None);
        assert_eq!(
            t.d.enqueue(t.t(2.0), 3, "general", None, 0),
            Err(Refusal::QueueFull)
        );
        // Another queue has its own limit.
        assert!(t.d.enqueue(t.t(2.0), 3, "other", None, 0).is_ok());
        t.d.abandon(t.t(3.0), 1);
        assert!(t.d.enqueue(t.t(3.0), 4, "general", None, 0).is_ok());
    }

    #[test]
    fn a_caller_whose_operator_is_lost_goes_back_to_the_front_of_the_line() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        t.enqueue(1.0, 1, None);
        assert_eq!(offers(&t.poll(1.0)), [(1, "a")]);
        t.answer(2.0, 1, "a");
        // Two callers came later; nobody is free.
        t.enqueue(3.0, 2, None);
        t.enqueue(4.0, 3, None);
        assert!(offers(&t.poll(4.0)).is_empty());
        // Agent a's browser is gone (logged out by the registrar), then the call says so.
        t.d.agent_logged_out(t.t(5.0), "a");
        assert!(t.d.requeue(t.t(5.0), 1, "a"));
        assert_eq!(
            t.d.position(1).unwrap().place,
            1,
            "ahead of those who came later"
        );
        assert_eq!(t.d.position(2).unwrap().place, 2);
        // The next free agent gets caller 1 first.
        t.login(6.0, &["b"]);
        assert_eq!(offers(&t.poll(6.0)), [(1, "b")]);
        // Twice, or for a caller who was never answered: nothing.
        assert!(!t.d.requeue(t.t(7.0), 1, "a"));
        assert!(!t.d.requeue(t.t(7.0), 3, "b"));
    }

    #[test]
    fn a_requeued_callers_agent_still_on_the_call_goes_to_wrap_up() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        t.enqueue(1.0, 1, None);
        t.poll(1.0);
        t.answer(2.0, 1, "a");
        assert!(t.d.requeue(t.t(3.0), 1, "a"));
        assert!(matches!(t.status("a"), AgentStatus::WrapUp { .. }));
        assert_eq!(t.d.position(1).unwrap().place, 1);
        // A caller that hangs up after being requeued is gone for good.
        t.d.abandon(t.t(4.0), 1);
        assert!(t.d.position(1).is_none());
    }

    #[test]
    fn logout_while_ringing_cancels_and_the_caller_goes_to_the_next_agent() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        t.enqueue(1.0, 1, None);
        t.enqueue(1.0, 2, None);
        assert_eq!(offers(&t.poll(1.0)), [(1, "a")]);
        t.login(2.0, &["b"]);
        assert_eq!(offers(&t.poll(2.0)), [(2, "b")]);
        t.d.agent_logged_out(t.t(3.0), "a");
        assert_eq!(cancels(&t.poll(3.0)), [(1, "a")]);
        assert_eq!(t.status("a"), AgentStatus::LoggedOut);
        assert_eq!(t.d.position(1).unwrap().place, 1);
        // Later answers or failures from a are ignored.
        t.answer(4.0, 1, "a");
        assert_eq!(t.status("a"), AgentStatus::LoggedOut);
        t.d.offer_failed(t.t(4.0), 2, "b", OfferFailure::Busy);
        t.d.unpause(t.t(4.0), "b");
        assert_eq!(offers(&t.poll(4.0)), [(1, "b")]);
    }

    #[test]
    fn position_and_ewt_follow_the_line_and_the_handle_time() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1)],
            &[QueueConfig {
                wrap_up_seconds: 10,
                ..queue("general", Strategy::LongestIdle)
            }],
        );
        t.login(0.0, &["a"]);
        // One free agent: the first caller will be taken at once.
        let p = t.enqueue(0.0, 1, None);
        assert_eq!((p.place, p.ewt), (1, Duration::ZERO));
        t.poll(0.0);
        t.answer(1.0, 1, "a");
        // Busy agent, default handle time 180 s.
        let p = t.enqueue(2.0, 2, None);
        assert_eq!((p.place, p.ewt), (1, Duration::from_secs(180)));
        let p = t.enqueue(3.0, 3, None);
        assert_eq!((p.place, p.ewt), (2, Duration::from_secs(360)));
        // Two busy agents: two callers per round.
        t.login(4.0, &["b"]);
        t.d.pause("b", "x");
        assert_eq!(t.d.position(3).unwrap().ewt, Duration::from_secs(360));
        t.d.unpause(t.t(4.0), "b");
        t.poll(4.0); // b rings for caller 2
        assert_eq!(t.d.position(3).unwrap().ewt, Duration::from_secs(180));
        // A 41 s call + 10 s wrap-up: handle time 51 s.
        t.end(42.0, "a");
        assert_eq!(t.figures().average_handle_time, Duration::from_secs(51));
        assert_eq!(t.d.position(3).unwrap().ewt, Duration::from_secs(51));
        // Caller 2 leaves: 3 moves up.
        t.d.abandon(t.t(43.0), 2);
        assert_eq!(t.d.position(3).unwrap().place, 1);
        assert_eq!(t.d.position(2), None);
    }

    #[test]
    fn handle_time_averages_the_last_twenty_calls() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[QueueConfig {
                wrap_up_seconds: 0,
                ..queue("general", Strategy::LongestIdle)
            }],
        );
        t.login(0.0, &["a"]);
        let mut s = 0.0;
        for c in 0..25u64 {
            // Five 1000 s calls first, then twenty 100 s calls.
            let talk = if c < 5 { 1000.0 } else { 100.0 };
            t.enqueue(s, c, None);
            t.poll(s);
            t.answer(s, c, "a");
            s += talk;
            t.end(s, "a");
            t.poll(s);
        }
        assert_eq!(t.figures().average_handle_time, Duration::from_secs(100));
    }

    #[test]
    fn figures_count_service_level_and_abandons() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        assert_eq!(t.figures().service_level, None);
        t.d.pause("a", "x");
        t.enqueue(0.0, 1, None); // answered at 20 s
        t.enqueue(0.0, 2, None); // answered at 100 s
        t.enqueue(0.0, 3, None); // abandons at 10 s
        t.enqueue(0.0, 4, None); // abandons at 200 s
        t.enqueue(0.0, 5, None); // still waiting
        let f = t.d.figures();
        assert_eq!(f.len(), 1);
        t.d.abandon(t.t(10.0), 3);
        t.d.unpause(t.t(20.0), "a");
        assert_eq!(offers(&t.poll(20.0)), [(1, "a")]);
        t.answer(20.0, 1, "a");
        t.end(50.0, "a");
        // Wrap-up ends at 60.
        assert!(offers(&t.poll(59.0)).is_empty());
        assert_eq!(offers(&t.poll(60.0)), [(2, "a")]);
        t.answer(70.0, 2, "a");
        t.d.abandon(t.t(200.0), 4);
        t.poll(250.0);
        let f = t.figures();
        assert_eq!(f.answered, 2);
        assert_eq!(f.answered_within_30s, 1);
        assert_eq!(f.abandoned, 2);
        assert_eq!(f.abandoned_within_30s, 1);
        assert_eq!(f.service_level, Some(0.25));
        assert_eq!(f.waiting, 1);
        assert_eq!(f.longest_wait, Duration::from_secs(250));
        assert_eq!(
            f.agents,
            AgentCounts {
                on_call: 1,
                ..AgentCounts::default()
            }
        );
        assert_eq!(f.strategy, "longest_idle");
    }

    #[test]
    fn pause_and_unpause() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        assert!(!t.d.pause("a", "x"), "logged out");
        assert!(!t.d.pause("nobody", "x"));
        t.login(0.0, &["a"]);
        assert!(t.d.pause("a", "lunch"));
        assert_eq!(
            t.status("a"),
            AgentStatus::Paused {
                reason: "lunch".into()
            }
        );
        t.enqueue(1.0, 1, None);
        assert!(offers(&t.poll(1.0)).is_empty());
        assert!(t.d.unpause(t.t(2.0), "a"));
        assert!(!t.d.unpause(t.t(2.0), "a"), "nothing to undo");
        assert_eq!(offers(&t.poll(2.0)), [(1, "a")]);
        // Pause while on a call: it starts when the call ends, instead of wrap-up.
        t.answer(3.0, 1, "a");
        assert!(t.d.pause("a", "after call"));
        assert_eq!(t.status("a"), AgentStatus::OnCall { caller: 1 });
        assert_eq!(t.d.agents()[0].pause_reason.as_deref(), Some("after call"));
        t.end(10.0, "a");
        assert_eq!(
            t.status("a"),
            AgentStatus::Paused {
                reason: "after call".into()
            }
        );
        // Pause while ringing, then the offer fails: paused, not no-answer pause.
        t.d.unpause(t.t(11.0), "a");
        t.enqueue(11.0, 2, None);
        assert_eq!(offers(&t.poll(11.0)), [(2, "a")]);
        assert!(t.d.pause("a", "phone"));
        t.d.offer_failed(t.t(12.0), 2, "a", OfferFailure::NoAnswer);
        assert!(matches!(t.status("a"), AgentStatus::Paused { .. }));
        // Unpause also ends a no-answer pause early.
        t.d.unpause(t.t(13.0), "a");
        assert_eq!(offers(&t.poll(13.0)), [(2, "a")]);
        t.d.offer_failed(t.t(14.0), 2, "a", OfferFailure::NoAnswer);
        assert!(t.d.unpause(t.t(15.0), "a"));
        assert_eq!(t.status("a"), AgentStatus::Available);
    }

    #[test]
    fn an_unreported_offer_is_withdrawn_after_ring_timeout_and_grace() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a", "b"]);
        t.enqueue(0.0, 1, None);
        let acts = t.poll(0.0);
        assert_eq!(
            acts,
            [Action::Offer {
                caller: 1,
                agent: "a".into(),
                ring_timeout: Duration::from_secs(20)
            }]
        );
        assert_eq!(t.d.next_deadline(), Some(t.t(25.0)));
        let acts = t.poll(25.0);
        assert_eq!(cancels(&acts), [(1, "a")]);
        assert_eq!(offers(&acts), [(1, "b")]);
        assert!(matches!(t.status("a"), AgentStatus::NoAnswerPause { .. }));
    }

    #[test]
    fn a_queue_the_config_does_not_list_uses_defaults() {
        let mut t = T::new(&[agent("a", &[], 1)], &[]);
        t.login(0.0, &["a"]);
        t.enqueue(0.0, 1, None);
        let acts = t.poll(0.0);
        assert!(matches!(
            &acts[..],
            [Action::Offer { ring_timeout, .. }] if *ring_timeout == Duration::from_secs(20)
        ));
        let f = t.d.figures();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].name.as_str(), f[0].waiting), ("general", 1));
    }

    #[test]
    fn queues_share_agents_in_one_line() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[
                queue("general", Strategy::LongestIdle),
                queue("potholes", Strategy::RoundRobin),
            ],
        );
        t.login(0.0, &["a"]);
        t.d.pause("a", "x");
        t.d.enqueue(t.t(1.0), 1, "potholes", None, 0).unwrap();
        let p = t.d.enqueue(t.t(2.0), 2, "general", None, 0).unwrap();
        assert_eq!(p.place, 1, "place counts only the caller's own queue");
        t.d.unpause(t.t(3.0), "a");
        assert_eq!(offers(&t.poll(3.0)), [(1, "a")]);
    }

    #[test]
    fn enqueue_twice_returns_the_current_position() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        t.login(0.0, &["a"]);
        t.d.pause("a", "x");
        t.enqueue(0.0, 1, None);
        t.enqueue(0.0, 2, None);
        assert_eq!(t.enqueue(1.0, 2, None).place, 2);
        assert_eq!(t.figures().waiting, 2);
    }

    #[test]
    fn login_twice_keeps_the_state() {
        let mut t = abc(Strategy::LongestIdle);
        t.enqueue(1.0, 1, None);
        t.poll(1.0);
        t.login(2.0, &["a"]);
        assert_eq!(t.status("a"), AgentStatus::Ringing { caller: 1 });
        t.d.agent_logged_in(t.t(2.0), "nobody");
    }

    #[test]
    fn views_serialize_for_the_admin_api() {
        let mut t = T::new(
            &[AgentConfig {
                name: Some("Ana".into()),
                ..agent("1001", &["en", "es"], 1)
            }],
            &[queue("general", Strategy::RingAll)],
        );
        t.login(0.0, &["1001"]);
        t.d.pause("1001", "x");
        let p = t.enqueue(0.0, 1, None);
        let v = serde_json::to_value(p).unwrap();
        assert_eq!(v, serde_json::json!({"place": 1, "ewt_seconds": 180}));
        t.d.unpause(t.t(30.0), "1001");
        t.poll(30.0);
        let v = serde_json::to_value(t.d.agents()).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{
                "id": "1001", "name": "Ana", "state": "ringing", "caller": 1,
                "pause_reason": null, "seconds_left": null, "calls_taken": 0,
                "idle_seconds": null, "skills": ["en", "es"], "tier": 1,
                "registered": true, "signed_off": false, "busy_elsewhere": false,
                "state_seconds": null, "queue": null
            }])
        );
        let v = serde_json::to_value(t.d.figures()).unwrap();
        assert_eq!(v[0]["name"], "general");
        assert_eq!(v[0]["strategy"], "ring_all");
        assert_eq!(v[0]["waiting"], 1);
        assert_eq!(v[0]["longest_wait_seconds"], 30);
        assert_eq!(v[0]["agents"]["ringing"], 1);
        assert_eq!(v[0]["service_level"], serde_json::Value::Null);
    }

    #[test]
    fn next_deadline_is_none_when_idle() {
        let mut t = abc(Strategy::LongestIdle);
        assert_eq!(t.d.next_deadline(), None);
        t.d.agent_logged_out(t.t(1.0), "a");
        assert_eq!(t.d.next_deadline(), None);
        assert!(t.poll(1.0).is_empty());
    }

    // ---- call-backs that keep the caller's place ----

    /// Agents `ids`, wrap-up 0; call-backs dialled at once, ringing 30 s, retried after 60 s.
    fn cb(ids: &[&str], attempts: u32) -> T {
        let agents: Vec<AgentConfig> = ids.iter().map(|id| agent(id, &[], 1)).collect();
        let mut t = T::new(
            &agents,
            &[QueueConfig {
                wrap_up_seconds: 0,
                ..queue("general", Strategy::LongestIdle)
            }],
        );
        t.d = std::mem::replace(&mut t.d, Dispatcher::new(&[], &[])).with_callback_policy(
            CallbackPolicy {
                ring_timeout: Duration::from_secs(30),
                attempts,
                retry_after: Duration::from_secs(60),
                first_delay: Duration::ZERO,
            },
        );
        t.login(0.0, ids);
        t
    }

    /// Put `agent` on a call with caller `busy` at `s`.
    fn busy(t: &mut T, s: f64, busy: CallerId, agent: &str) {
        t.enqueue(s, busy, None);
        assert_eq!(offers(&t.poll(s)), vec![(busy, agent)]);
        t.answer(s, busy, agent);
    }

    fn dials(actions: &[Action]) -> Vec<(CallerId, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::DialBack {
                    caller, attempt, ..
                } => Some((*caller, *attempt)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_call_back_keeps_its_place_is_dialled_when_it_comes_up_and_offered_once_answered() {
        let mut t = cb(&["a"], 3);
        busy(&mut t, 0.0, 9, "a");
        t.enqueue(1.0, 1, None);
        t.enqueue(2.0, 2, None);
        assert!(t.d.request_callback(t.t(3.0), 1));
        assert!(t.poll(3.0).is_empty());
        let f = t.figures();
        assert_eq!(
            (f.waiting, f.callbacks_pending, f.callbacks_requested),
            (2, 1, 1)
        );
        assert_eq!(t.d.position(2).unwrap().place, 2, "caller 2 stays behind");
        assert_eq!(
            f.longest_wait,
            Duration::from_secs(2),
            "waited since arrival"
        );

        // The agent frees up: the caller is rung back; caller 2 does not overtake meanwhile.
        t.end(10.0, "a");
        let acts = t.poll(10.0);
        assert_eq!(dials(&acts), vec![(1, 1)]);
        assert!(offers(&acts).is_empty(), "{acts:?}");
        assert!(matches!(
            acts[0],
            Action::DialBack { ring_timeout, .. } if ring_timeout == Duration::from_secs(30)
        ));
        assert!(t.poll(20.0).is_empty());

        t.d.callback_answered(t.t(21.0), 1);
        assert_eq!(offers(&t.poll(21.0)), vec![(1, "a")]);
        t.answer(22.0, 1, "a");
        let f = t.figures();
        assert_eq!((f.waiting, f.callbacks_pending, f.answered), (1, 0, 2));
        assert_eq!(t.status("a"), AgentStatus::OnCall { caller: 1 });
    }

    #[test]
    fn an_unanswered_call_back_is_retried_then_filed_and_frees_the_held_agent() {
        let mut t = cb(&["a"], 2);
        busy(&mut t, 0.0, 9, "a");
        t.enqueue(1.0, 1, None);
        assert!(t.d.request_callback(t.t(2.0), 1));
        t.end(10.0, "a");
        assert_eq!(dials(&t.poll(10.0)), vec![(1, 1)]);
        t.enqueue(20.0, 2, None);
        assert!(offers(&t.poll(20.0)).is_empty(), "a is held for the dial");

        // No answer: parked for 60 s, and the agent goes to caller 2 at once.
        t.d.callback_failed(t.t(40.0), 1);
        let acts = t.poll(40.0);
        assert_eq!(offers(&acts), vec![(2, "a")]);
        assert!(dials(&acts).is_empty());
        t.answer(41.0, 2, "a");
        t.end(50.0, "a");
        assert!(dials(&t.poll(50.0)).is_empty(), "not before the retry time");
        assert_eq!(t.d.next_deadline(), Some(t.t(100.0)));
        assert_eq!(dials(&t.poll(100.0)), vec![(1, 2)]);

        // The last attempt fails: the entry leaves with a ticket to file.
        t.d.callback_failed(t.t(130.0), 1);
        assert_eq!(t.poll(130.0), vec![Action::CallbackUnreached { caller: 1 }]);
        let f = t.figures();
        assert_eq!(
            (
                f.waiting,
                f.callbacks_pending,
                f.callbacks_unreached,
                f.abandoned
            ),
            (0, 0, 1, 1)
        );
        assert_eq!(t.d.position(1), None);
    }

    #[test]
    fn a_dial_whose_outcome_never_comes_counts_as_unanswered_not_before() {
        let mut t = cb(&["a"], 1);
        t.enqueue(0.0, 1, None);
        assert_eq!(offers(&t.poll(0.0)), vec![(1, "a")]);
        t.d.request_callback(t.t(1.0), 1);
        // The ringing offer is withdrawn at no cost, and the agent is free for the dial.
        let acts = t.poll(1.0);
        assert_eq!(cancels(&acts), vec![(1, "a")]);
        assert_eq!(dials(&acts), vec![(1, 1)]);
        assert_eq!(
            t.d.next_deadline(),
            Some(t.t(36.0)),
            "30 s ring + 5 s grace"
        );
        assert!(t.poll(35.9).is_empty(), "still pending just before");
        assert_eq!(t.figures().waiting, 1);
        assert_eq!(t.poll(36.0), vec![Action::CallbackUnreached { caller: 1 }]);
    }

    #[test]
    fn after_answering_a_failed_agent_offer_goes_to_the_next_agent() {
        let mut t = cb(&["a", "b"], 3);
        busy(&mut t, 0.0, 8, "a");
        busy(&mut t, 0.0, 9, "b");
        t.enqueue(1.0, 1, None);
        t.d.request_callback(t.t(2.0), 1);
        t.end(10.0, "a");
        assert_eq!(dials(&t.poll(10.0)), vec![(1, 1)]);
        t.d.callback_answered(t.t(15.0), 1);
        assert_eq!(offers(&t.poll(15.0)), vec![(1, "a")]);
        t.d.offer_failed(t.t(20.0), 1, "a", OfferFailure::NoAnswer);
        assert!(offers(&t.poll(20.0)).is_empty(), "b is still on a call");
        assert!(matches!(t.status("a"), AgentStatus::NoAnswerPause { .. }));
        t.end(25.0, "b");
        assert_eq!(offers(&t.poll(25.0)), vec![(1, "b")]);
        assert_eq!(t.d.position(1).map(|p| p.place), Some(1));
    }

    #[test]
    fn a_called_back_caller_who_hangs_up_is_abandoned_and_releases_the_agent() {
        let mut t = cb(&["a"], 3);
        busy(&mut t, 0.0, 9, "a");
        t.enqueue(1.0, 1, None);
        t.d.request_callback(t.t(2.0), 1);
        t.end(10.0, "a");
        t.poll(10.0);
        t.d.callback_answered(t.t(15.0), 1);
        assert_eq!(offers(&t.poll(15.0)), vec![(1, "a")]);
        t.d.abandon(t.t(16.0), 1);
        assert_eq!(cancels(&t.poll(16.0)), vec![(1, "a")]);
        assert_eq!(t.status("a"), AgentStatus::Available);
        let f = t.figures();
        assert_eq!((f.waiting, f.abandoned, f.callbacks_unreached), (0, 1, 0));
        // Reports about a call-back that is gone are ignored.
        t.d.callback_failed(t.t(17.0), 1);
        t.d.callback_answered(t.t(17.0), 1);
        assert!(t.poll(17.0).is_empty());
    }

    #[test]
    fn request_callback_needs_a_caller_waiting_on_the_line_and_honours_the_first_delay() {
        let mut t = cb(&["a"], 3);
        t.d = std::mem::replace(&mut t.d, Dispatcher::new(&[], &[])).with_callback_policy(
            CallbackPolicy {
                first_delay: Duration::from_secs(10),
                ..CallbackPolicy::default()
            },
        );
        t.login(0.0, &["a"]);
        assert!(!t.d.request_callback(t.t(0.0), 1), "not waiting");
        busy(&mut t, 0.0, 9, "a");
        t.enqueue(1.0, 1, None);
        assert!(t.d.request_callback(t.t(1.0), 1));
        assert!(!t.d.request_callback(t.t(1.0), 1), "only once");
        assert!(
            !t.d.request_callback(t.t(1.0), 9),
            "9 is talking to an agent"
        );
        t.end(2.0, "a");
        assert!(t.poll(2.0).is_empty(), "not dialled within the first delay");
        // A new caller meanwhile takes the free agent: nobody is held for a parked entry.
        t.enqueue(3.0, 2, None);
        assert_eq!(offers(&t.poll(3.0)), vec![(2, "a")]);
        t.answer(3.0, 2, "a");
        t.end(12.0, "a");
        assert_eq!(dials(&t.poll(12.0)), vec![(1, 1)]);
    }

    #[test]
    fn ring_all_offers_withdrawn_by_a_call_back_cost_nothing_and_are_not_repeated() {
        let mut t = T::new(
            &[agent("a", &[], 1), agent("b", &[], 1)],
            &[QueueConfig {
                wrap_up_seconds: 0,
                ..queue("general", Strategy::RingAll)
            }],
        );
        t.d = std::mem::replace(&mut t.d, Dispatcher::new(&[], &[])).with_callback_policy(
            CallbackPolicy {
                first_delay: Duration::ZERO,
                ..CallbackPolicy::default()
            },
        );
        t.login(0.0, &["a", "b"]);
        t.enqueue(0.0, 1, None);
        assert_eq!(offers(&t.poll(0.0)), vec![(1, "a"), (1, "b")]);
        t.d.request_callback(t.t(1.0), 1);
        let acts = t.poll(1.0);
        assert_eq!(cancels(&acts), vec![(1, "a"), (1, "b")]);
        assert_eq!(dials(&acts), vec![(1, 1)]);
        t.d.callback_answered(t.t(2.0), 1);
        assert_eq!(offers(&t.poll(2.0)), vec![(1, "a"), (1, "b")]);
        t.d.withdraw_offer(1, "b");
        assert_eq!(t.status("b"), AgentStatus::Available);
        assert!(t.poll(3.0).is_empty(), "no second offer while a rings");
        t.answer(4.0, 1, "a");
        assert_eq!(t.figures().answered, 1);
    }

    #[test]
    fn a_parked_call_back_gets_no_max_wait_but_an_answered_one_does() {
        let mut t = cb(&["a"], 3);
        busy(&mut t, 0.0, 9, "a");
        t.enqueue(1.0, 1, None);
        t.d.request_callback(t.t(2.0), 1);
        // Way past max_wait_seconds (600): still parked, no MaxWait, no announcements.
        assert!(t.poll(1000.0).is_empty());
        t.end(1001.0, "a");
        t.poll(1001.0);
        t.d.callback_answered(t.t(1002.0), 1);
        t.poll(1002.0);
        t.d.offer_failed(t.t(1003.0), 1, "a", OfferFailure::Busy);
        t.d.agent_logged_out(t.t(1004.0), "a");
        assert_eq!(t.poll(1004.0), vec![Action::MaxWait { caller: 1 }]);
    }

    // ---- the driver (real time, short) ----

    async fn recv(rx: &mut mpsc::Receiver<QueueEvent>) -> QueueEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event in time")
            .expect("channel open")
    }

    /// In a cluster the phone rings only once the cluster granted the claim; a refused claim
    /// leaves the caller waiting and the agent untried for the wait; the driver holds the
    /// agent while it is busy here and lets it go when it is free.
    #[tokio::test(start_paused = true)]
    async fn driver_rings_an_agent_only_once_the_cluster_grants_the_claim() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let d = Dispatcher::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::RingAll)],
        );
        let q = spawn_dispatcher(d, &tracker, cancel.clone());
        let (ctx, mut crx) = mpsc::channel(16);
        q.join_cluster(ctx).await;
        q.agent_logged_in("a").await;
        let (tx, mut rx) = mpsc::channel(8);
        q.enqueue(2, "general", None, 0, tx).await.unwrap();
        let claim = |c: Option<ClusterCmd>| match c {
            Some(ClusterCmd::Claim { caller, agent, .. }) => (caller, agent),
            other => panic!("expected a claim, got {other:?}"),
        };
        assert_eq!(claim(crx.recv().await), (2, "a".to_owned()));
        assert!(
            rx.try_recv().is_err(),
            "the phone does not ring before the claim"
        );
        q.claimed(
            2,
            "a".into(),
            ClaimReply::Refused {
                retry_after: Duration::from_secs(1),
            },
        )
        .await;
        let started = tokio::time::Instant::now();
        assert_eq!(claim(crx.recv().await), (2, "a".to_owned()));
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "tried again after the wait"
        );
        assert_eq!(
            q.agents().await[0].status,
            AgentStatus::Ringing { caller: 2 }
        );
        q.claimed(2, "a".into(), ClaimReply::Granted).await;
        assert_eq!(
            recv(&mut rx).await,
            QueueEvent::Offer {
                agent: "a".into(),
                ring_timeout: Duration::from_secs(20)
            }
        );
        q.offer_answered(2, "a").await;
        q.call_ended("a").await;
        // Wrap-up over, the agent is free here: the hold is let go.
        match crx.recv().await {
            Some(ClusterCmd::Release(agent)) => assert_eq!(agent, "a"),
            other => panic!("expected the hold let go, got {other:?}"),
        }
        // Held by another node: nothing offered; the queue shows it.
        q.held_elsewhere(HashSet::from(["a".to_owned()])).await;
        let (tx, _rx3) = mpsc::channel(8);
        q.enqueue(3, "general", None, 0, tx).await.unwrap();
        assert!(q.agents().await[0].busy_elsewhere);
        assert_eq!(q.line().await.len(), 1);
        assert!(
            crx.try_recv().is_err(),
            "no claim for an agent held elsewhere"
        );
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn driver_offers_connects_and_reports() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let d = Dispatcher::new(
            &[agent("a", &[], 1), agent("b", &[], 1)],
            &[queue("general", Strategy::RingAll)],
        );
        let q = spawn_dispatcher(d, &tracker, cancel.clone());
        let (tx, _rx) = mpsc::channel(8);
        assert_eq!(
            q.enqueue(1, "general", None, 0, tx).await,
            Err(Refusal::NoAgents)
        );
        q.agent_logged_in("a").await;
        q.agent_logged_in("b").await;
        let (tx, mut rx) = mpsc::channel(8);
        let p = q
            .enqueue(2, "general", Some("en".into()), 0, tx)
            .await
            .unwrap();
        assert_eq!((p.place, p.ewt), (1, Duration::ZERO));
        let mut rung = Vec::new();
        for _ in 0..2 {
            match recv(&mut rx).await {
                QueueEvent::Offer {
                    agent,
                    ring_timeout,
                } => {
                    assert_eq!(ring_timeout, Duration::from_secs(20));
                    rung.push(agent);
                }
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(rung, ["a", "b"]);
        q.offer_answered(2, "b").await;
        assert_eq!(
            recv(&mut rx).await,
            QueueEvent::CancelOffer { agent: "a".into() }
        );
        let agents = q.agents().await;
        assert_eq!(agents[1].status, AgentStatus::OnCall { caller: 2 });
        assert!(q.pause("a", "lunch").await);
        assert!(q.unpause("a").await);
        q.call_ended("b").await;
        let f = q.figures().await;
        assert_eq!((f[0].answered, f[0].answered_within_30s), (1, 1));
        assert!(matches!(
            q.agents().await[1].status,
            AgentStatus::WrapUp { .. }
        ));

        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        // The queue is gone: the events channel closes, and the handle answers safely.
        assert_eq!(rx.recv().await, None);
        let (tx, _rx) = mpsc::channel(8);
        assert_eq!(
            q.enqueue(3, "general", None, 0, tx).await,
            Err(Refusal::NoAgents)
        );
        assert!(!q.pause("a", "x").await);
        assert!(q.figures().await.is_empty());
    }

    #[test]
    fn an_operator_signed_off_at_the_console_stays_out_while_the_phone_registers() {
        let mut t = T::new(&[agent("a", &[], 1), agent("b", &[], 1)], &[]);
        t.login(0.0, &["a", "b"]);
        let now = t.t(1.0);
        assert_eq!(t.d.agent_request(now, "a", AgentRequest::SignOff), Ok(()));
        assert_eq!(t.status("a"), AgentStatus::LoggedOut);
        // A registration refresh from a new address does not log them back in.
        t.login(2.0, &["a"]);
        assert_eq!(t.status("a"), AgentStatus::LoggedOut);
        t.enqueue(3.0, 1, None);
        assert_eq!(offers(&t.poll(3.0)), [(1, "b")]);
        // Ready: available at once, the phone being registered.
        let now = t.t(4.0);
        assert_eq!(t.d.agent_request(now, "a", AgentRequest::Ready), Ok(()));
        assert_eq!(t.status("a"), AgentStatus::Available);
        let view = t.d.agents().into_iter().find(|v| v.id == "a").unwrap();
        assert!(view.registered && !view.signed_off);
        // Ready without a registered phone: available once it registers.
        let now = t.t(5.0);
        t.d.agent_request(now, "a", AgentRequest::SignOff).unwrap();
        t.d.agent_logged_out(now, "a");
        assert_eq!(t.d.agent_request(now, "a", AgentRequest::Ready), Ok(()));
        assert_eq!(t.status("a"), AgentStatus::LoggedOut);
        assert_eq!(
            t.d.agent_request(
                now,
                "a",
                AgentRequest::NotReady {
                    reason: "break".into()
                }
            ),
            Err(RequestRefusal::NotRegistered)
        );
        t.login(6.0, &["a"]);
        assert_eq!(t.status("a"), AgentStatus::Available);
        assert_eq!(
            t.d.agent_request(now, "zz", AgentRequest::Ready),
            Err(RequestRefusal::UnknownAgent)
        );
    }

    #[test]
    fn not_ready_skips_the_agent_and_ready_takes_calls_again() {
        let mut t = T::new(&[agent("a", &[], 1), agent("b", &[], 2)], &[]);
        t.login(0.0, &["a", "b"]);
        let now = t.t(1.0);
        let lunch = AgentRequest::NotReady {
            reason: "lunch".into(),
        };
        t.d.agent_request(now, "a", lunch).unwrap();
        assert_eq!(
            t.status("a"),
            AgentStatus::Paused {
                reason: "lunch".into()
            }
        );
        t.enqueue(2.0, 1, None);
        // `a` is the better tier but not ready: `b` rings.
        assert_eq!(offers(&t.poll(2.0)), [(1, "b")]);
        let now = t.t(3.0);
        t.d.agent_request(now, "a", AgentRequest::Ready).unwrap();
        t.enqueue(3.0, 2, None);
        assert_eq!(offers(&t.poll(3.0)), [(2, "a")]);
        // Signing off while ringing withdraws the offer; the caller is offered again.
        let now = t.t(4.0);
        t.d.agent_request(now, "a", AgentRequest::SignOff).unwrap();
        assert_eq!(cancels(&t.poll(4.0)), [(2, "a")]);
        // On a call, signing off takes effect when the call ends.
        t.answer(5.0, 1, "b");
        let now = t.t(5.0);
        assert_eq!(t.d.agent_request(now, "b", AgentRequest::SignOff), Ok(()));
        assert_eq!(t.status("b"), AgentStatus::OnCall { caller: 1 });
        t.end(9.0, "b");
        assert_eq!(t.status("b"), AgentStatus::LoggedOut);
    }

    #[test]
    fn wrap_up_ends_early_or_is_extended_within_a_bound() {
        let mut t = T::new(
            &[agent("a", &[], 1)],
            &[QueueConfig {
                wrap_up_seconds: 30,
                ..queue("general", Strategy::LongestIdle)
            }],
        );
        t.login(0.0, &["a"]);
        t.enqueue(1.0, 1, None);
        t.poll(1.0);
        t.answer(2.0, 1, "a");
        t.end(10.0, "a");
        assert_eq!(t.status("a"), AgentStatus::WrapUp { until: t.t(40.0) });
        let now = t.t(11.0);
        assert_eq!(
            t.d.agent_request(
                now,
                "a",
                AgentRequest::ExtendWrapUp(Duration::from_secs(60))
            ),
            Ok(())
        );
        assert_eq!(t.status("a"), AgentStatus::WrapUp { until: t.t(100.0) });
        // Never past MAX_WRAP_UP from now.
        t.d.agent_request(
            now,
            "a",
            AgentRequest::ExtendWrapUp(Duration::from_secs(99_999)),
        )
        .unwrap();
        assert_eq!(
            t.status("a"),
            AgentStatus::WrapUp {
                until: now + MAX_WRAP_UP
            }
        );
        assert_eq!(t.d.agent_request(now, "a", AgentRequest::EndWrapUp), Ok(()));
        assert_eq!(t.status("a"), AgentStatus::Available);
        assert_eq!(
            t.d.agent_request(now, "a", AgentRequest::EndWrapUp),
            Err(RequestRefusal::NotInWrapUp)
        );
    }

    #[test]
    fn a_declined_offer_is_withdrawn_and_counts_as_no_answer() {
        let mut t = abc(Strategy::LongestIdle);
        t.enqueue(1.0, 1, None);
        let first = offers(&t.poll(1.0))[0].1.to_owned();
        let now = t.t(2.0);
        // Only the agent it rings for can decline it.
        let other = if first == "a" { "b" } else { "a" };
        assert!(!t.d.decline(now, 1, other));
        assert!(t.d.decline(now, 1, &first));
        let out = t.poll(2.0);
        assert_eq!(cancels(&out), [(1, first.as_str())]);
        assert!(matches!(
            t.status(&first),
            AgentStatus::NoAnswerPause { .. }
        ));
        // The caller keeps its place and rings the next agent at once.
        assert_eq!(offers(&out).len(), 1);
        assert_ne!(offers(&out)[0].1, first);
    }

    #[tokio::test]
    async fn driver_tells_consoles_of_offers_with_the_callers_context_and_of_state_changes() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let d = Dispatcher::new(&[agent("a", &[], 1)], &[]);
        let q = spawn_dispatcher(d, &tracker, cancel.clone());
        let mut notices = q.notices();
        q.agent_logged_in("a").await;
        let ctx = CallerContext {
            number: "+15551230001".into(),
            call_id: "c1@example".into(),
            language: "es".into(),
            menu_path: "language:2 > screening:1 > main:0".into(),
            ..CallerContext::default()
        };
        let (tx, _rx) = mpsc::channel(8);
        q.enqueue_with_context(7, "general", None, 0, Some(ctx.clone()), tx)
            .await
            .unwrap();
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|n| matches!(n, AgentNotice::State(v) if v.state == "ringing"))
        {
            seen.push(notices.recv().await.unwrap());
        }
        let offer = seen
            .iter()
            .find_map(|n| match n {
                AgentNotice::Offer(o) => Some(o.clone()),
                _ => None,
            })
            .expect("an offer notice");
        assert_eq!((offer.agent.as_str(), offer.caller), ("a", 7));
        assert_eq!(offer.context.as_deref(), Some(&ctx));
        let view = q.console("a").await.unwrap();
        assert_eq!(view.offer.map(|o| o.caller), Some(7));
        // Declined: the console hears the no-answer pause.
        assert!(q.decline(7, "a").await);
        loop {
            if let AgentNotice::State(v) = notices.recv().await.unwrap() {
                if v.state == "no_answer_pause" {
                    break;
                }
            }
        }
        assert_eq!(q.console("a").await.unwrap().offer, None);
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn driver_withdraws_an_offer_the_caller_cannot_take_yet() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let d = Dispatcher::new(&[agent("a", &[], 1)], &[]);
        let q = spawn_dispatcher(d, &tracker, cancel.clone());
        q.agent_logged_in("a").await;
        // A call that has not read its (one-slot) channel yet.
        let (tx, mut rx) = mpsc::channel(1);
        tx.try_send(QueueEvent::MaxWait).unwrap();
        q.enqueue(1, "general", None, 0, tx).await.unwrap();
        // The offer could not be delivered: withdrawn at no cost to the agent.
        assert_eq!(q.agents().await[0].status, AgentStatus::Available);
        assert_eq!(recv(&mut rx).await, QueueEvent::MaxWait);
        // Offered again on the next pass once the call reads its events.
        assert_eq!(
            q.agents().await[0].status,
            AgentStatus::Ringing { caller: 1 }
        );
        assert!(matches!(recv(&mut rx).await, QueueEvent::Offer { .. }));
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn driver_abandons_a_caller_whose_call_is_gone() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let d = Dispatcher::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        );
        let q = spawn_dispatcher(d, &tracker, cancel.clone());
        q.agent_logged_in("a").await;
        let (tx, mut rx) = mpsc::channel(8);
        q.enqueue(1, "general", None, 0, tx).await.unwrap();
        assert!(matches!(recv(&mut rx).await, QueueEvent::Offer { .. }));
        drop(rx);
        // Noticed by the sweep within a second: the offer is withdrawn, the agent is free.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if q.agents().await[0].status == AgentStatus::Available {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never abandoned");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(q.figures().await[0].abandoned, 1);
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn driver_hands_a_call_back_to_its_own_listener_and_keeps_it_after_the_call_hangs_up() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let d = Dispatcher::new(
            &[agent("a", &[], 1)],
            &[queue("general", Strategy::LongestIdle)],
        )
        .with_callback_policy(CallbackPolicy {
            first_delay: Duration::ZERO,
            ..CallbackPolicy::default()
        });
        let q = spawn_dispatcher(d, &tracker, cancel.clone());
        q.agent_logged_in("a").await;
        assert!(q.pause("a", "busy").await);
        let (tx, rx) = mpsc::channel(8);
        q.enqueue(1, "general", None, 0, tx).await.unwrap();
        let (cb_tx, mut cb_rx) = mpsc::channel(8);
        assert!(q.request_callback(1, cb_tx).await);
        let (other, _) = mpsc::channel(8);
        assert!(!q.request_callback(2, other).await, "2 is not waiting");
        // The call hangs up; well past a sweep, the place is still kept.
        drop(rx);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let f = &q.figures().await[0];
        assert_eq!((f.waiting, f.callbacks_pending, f.abandoned), (1, 1, 0));
        // The agent is back: the call-back's listener is told to dial, then gets the offer.
        assert!(q.unpause("a").await);
        let ev = tokio::time::timeout(Duration::from_secs(5), cb_rx.recv()).await;
        assert!(matches!(
            ev,
            Ok(Some(CallbackEvent::DialBack { attempt: 1, .. }))
        ));
        q.callback_answered(1).await;
        let ev = tokio::time::timeout(Duration::from_secs(5), cb_rx.recv()).await;
        assert!(
            matches!(&ev, Ok(Some(CallbackEvent::Queue(QueueEvent::Offer { agent, .. }))) if agent == "a"),
            "{ev:?}"
        );
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
