//! Call history that lasts: one row per call, operators' states, queue events (as Asterisk's
//! `queue_log`), in the ticket database, for the reports ([`report`]) and the public
//! dashboard (`crate::api::dashboard`).
//!
//! | part | owns | must not touch |
//! | --- | --- | --- |
//! | [`History`] | the handle calls and the queue report through: never blocks, never waits | SQL |
//! | `writer` | the task that writes batches, prunes daily, drains on a clean stop | calls |
//! | [`report`] | the report queries and their formulas | writing |
//! | [`rollup`] | the calls report's sums per 15 minutes and queue, kept as rows are written | the record (it is derived, rebuilt when the thresholds change) |
//! | [`open_data`] | the public figures: aggregates only, small counts suppressed | call-level rows |
//!
//! Written off the call's path: a call (or the queue) hands a record to [`History`], which
//! puts it on a bounded channel (`history.queue`, default 65,536 records) with `try_send`;
//! the writer task takes everything waiting and inserts it in one transaction. At 100 new
//! calls a second, each leaving about six records (the call, its queue events, its
//! operator's states), the default channel holds almost two minutes of a stalled disk. If
//! it is full anyway the record is dropped, counted in `ivr311_history_dropped_total` and
//! logged at warn: a slow disk never delays audio or SIP. A clean stop
//! ([`HistoryWriter::stop`], after every call has ended) writes everything still queued; a
//! crash loses the calls in progress and what had not been written yet (a moment's worth).
//!
//! Times are Unix epoch milliseconds (UTC). Cores hand in `Instant`s; [`wall_ms`] turns
//! them into wall time as they are handed over.

pub mod open_data;
pub mod report;
pub mod rollup;
mod writer;

pub(crate) use writer::{hash_key, hash_number, prune};
pub use writer::{spawn_writer, HistoryWriter};

use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::warn;

/// The `history:` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Callers' numbers older than this many days are replaced by a keyed hash (the same
    /// caller still counts as the same, nobody can read the number back). Default 90;
    /// 0 hashes them at the next daily pass.
    pub hash_numbers_after_days: u32,
    /// Records waiting to be written, at most. Default 65,536 (see the module docs).
    pub queue: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            hash_numbers_after_days: 90,
            queue: 65_536,
        }
    }
}

/// Milliseconds since the Unix epoch now.
pub fn epoch_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The wall time (epoch ms) of `at`, an instant on tokio's clock (the clock calls and the
/// queue read `now` from).
pub fn wall_ms(at: Instant) -> i64 {
    let now = tokio::time::Instant::now().into_std();
    let wall = epoch_ms_now();
    match now.checked_duration_since(at) {
        Some(ago) => wall - ago.as_millis() as i64,
        None => wall + at.duration_since(now).as_millis() as i64,
    }
}

/// Where an abandoned call was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbandonedIn {
    /// Before we answered.
    Ringing,
    Menu,
    Queue,
}

impl AbandonedIn {
    pub fn as_str(self) -> &'static str {
        match self {
            AbandonedIn::Ringing => "ringing",
            AbandonedIn::Menu => "menu",
            AbandonedIn::Queue => "queue",
        }
    }
}

/// What a call achieved, with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A ticket was filed (its number once the store gave one).
    Ticket { id: Option<u64>, service: String },
    /// The caller heard information (hours, a ticket's status) and hung up.
    Info,
    /// Sent to 911; the audit row's id.
    Emergency { audit_id: Option<i64> },
    /// Talked to an operator (the queue visit has the details).
    Bridged,
    /// Left before anything was done.
    Abandoned { at: AbandonedIn, after_ms: i64 },
    /// Asked to be called back, keeping their place.
    Callback,
    /// Refused before the answer.
    Rejected { code: u16, why: String },
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ticket { .. } => "ticket",
            Outcome::Info => "info",
            Outcome::Emergency { .. } => "emergency",
            Outcome::Bridged => "bridged",
            Outcome::Abandoned { .. } => "abandoned",
            Outcome::Callback => "callback",
            Outcome::Rejected { .. } => "rejected",
        }
    }
}

/// A call's time in an operator queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueVisit {
    pub queue: String,
    pub entered_ms: i64,
    /// Until an operator answered, or the caller left the queue.
    pub wait_ms: i64,
    /// The operator who answered.
    pub agent: Option<String>,
    pub talk_ms: Option<i64>,
}

/// One finished call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub call_id: String,
    pub started_ms: i64,
    pub answered_ms: Option<i64>,
    pub ended_ms: i64,
    pub caller: String,
    pub caller_verified: bool,
    pub dialled: String,
    pub language: Option<String>,
    pub menu_path: Option<String>,
    pub outcome: Outcome,
    pub end_reason: Option<String>,
    pub queue: Option<QueueVisit>,
}

/// A queue event (Asterisk's `queue_log` verbs, in plain words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueEventKind {
    /// The caller entered the queue (`ENTERQUEUE`), at `position`.
    Enter,
    /// An operator's phone was rung (`RINGNOANSWER` is the offer that failed).
    Offer,
    /// An operator answered (`CONNECT`), after `wait`.
    Answer,
    /// The caller left unanswered (`ABANDON`), after `wait`.
    Abandon,
    /// The call was transferred (`TRANSFER`).
    Transfer,
    /// The operator's call ended (`COMPLETECALLER`/`COMPLETEAGENT`), after `talk`.
    Complete,
    /// The caller asked to be called back, keeping the place.
    CallbackRequested,
    /// Every call-back attempt failed.
    CallbackUnreached,
}

impl QueueEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueEventKind::Enter => "enter",
            QueueEventKind::Offer => "offer",
            QueueEventKind::Answer => "answer",
            QueueEventKind::Abandon => "abandon",
            QueueEventKind::Transfer => "transfer",
            QueueEventKind::Complete => "complete",
            QueueEventKind::CallbackRequested => "callback_requested",
            QueueEventKind::CallbackUnreached => "callback_unreached",
        }
    }
}

/// One queue event, as the queue core reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEventRecord {
    pub at_ms: i64,
    pub call_id: Option<String>,
    pub queue: String,
    pub agent: Option<String>,
    pub event: QueueEventKind,
    pub wait_ms: Option<i64>,
    pub talk_ms: Option<i64>,
    pub position: Option<i64>,
}

/// A span of time an operator spent in one state. A `wrap_up` span also gives its length to
/// the operator's call that ended as it began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStateRecord {
    pub agent: String,
    /// [`crate::dispatch::queue::AgentStatus::as_str`].
    pub state: &'static str,
    /// Why, for `paused`.
    pub reason: Option<String>,
    pub started_ms: i64,
    pub ended_ms: i64,
}

/// What the writer is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Call(Box<CallRecord>),
    Queue(QueueEventRecord),
    AgentState(AgentStateRecord),
    /// A call-back finished after its call's row was written: attempts and result.
    CallbackResult {
        call_id: String,
        attempts: u32,
        result: &'static str,
    },
}

/// Looks up a live call's Call-ID from the queue's caller id (the registry's).
pub type CallIdLookup = Arc<dyn Fn(u64) -> Option<String> + Send + Sync>;

/// Hands records to the writer without ever blocking. Cheap to clone.
#[derive(Clone)]
pub struct History {
    tx: Option<mpsc::Sender<Record>>,
    dropped: Arc<AtomicU64>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    call_ids: Option<CallIdLookup>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("enabled", &self.tx.is_some())
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish()
    }
}

impl History {
    /// A handle that writes nothing (for cores tested alone).
    pub fn disabled() -> History {
        History {
            tx: None,
            dropped: Arc::default(),
            metrics: None,
            call_ids: None,
        }
    }

    pub(crate) fn new(tx: mpsc::Sender<Record>, metrics: Arc<crate::metrics::Metrics>) -> Self {
        History {
            tx: Some(tx),
            dropped: Arc::default(),
            metrics: Some(metrics),
            call_ids: None,
        }
    }

    /// How queue events find their call's Call-ID.
    pub fn with_call_ids(mut self, lookup: CallIdLookup) -> Self {
        self.call_ids = Some(lookup);
        self
    }

    /// The Call-ID of the queue's caller `id`, while the call is live.
    pub fn call_id(&self, id: u64) -> Option<String> {
        self.call_ids.as_ref().and_then(|f| f(id))
    }

    /// Records dropped because the writer was behind.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Hand `r` to the writer; dropped (counted, logged) if it is `history.queue` behind.
    pub fn record(&self, r: Record) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(r) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(m) = &self.metrics {
                    m.add(
                        "ivr311_history_dropped_total",
                        "History records dropped because the writer was behind (history.queue full).",
                        &[],
                        1,
                    );
                }
                // The first drop, then one line per thousand: a stalled disk must not also
                // flood the log.
                if n == 1 || n.is_multiple_of(1000) {
                    warn!(
                        dropped = n,
                        "call history writer is behind (history.queue full); record dropped"
                    );
                }
            }
            // The writer has stopped (the server is stopping): nothing more is written.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Errors of the history store.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history database: {0}")]
    Db(#[from] sqlx::Error),
}
