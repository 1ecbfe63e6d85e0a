//! The live calls, as the HTTP API and `/health` see them.
//!
//! [`CallRegistry`] is written by the call drivers (a call's entry is added when it is
//! answered, its language and state updated when they change, removed when it ends) and read
//! by the API. It holds no call state beyond what it shows: an admin's hang-up reaches the call
//! through the entry's cancellation token, an admin's transfer through the call's command
//! channel ([`CallCommand`]), and the call's core answers. The transfers calls made are kept
//! for `/admin/transfers/{id}` (every one in progress, and the latest [`FINISHED_TRANSFERS`]
//! finished).

use super::core::{OperatorView, TransferView};
use super::driver::LegIo;
use super::transfer::{Connected, Transfer, TransferId};
use crate::sip::ua::DialogId;
use dashmap::DashMap;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Finished transfers kept for `/admin/transfers/{id}`.
pub const FINISHED_TRANSFERS: usize = 1024;

/// How long the API waits for a call to answer a command.
const COMMAND_WITHIN: Duration = Duration::from_secs(5);

/// What the API (and operators' own calls) ask of a live call.
#[derive(Debug)]
pub(crate) enum CallCommand {
    /// The caller's operator is consulting this target from their phone (`None`: no more).
    Consulting(Option<String>),
    /// Transfer the caller to `to` (the dial plan's admin forms), as `via` asks.
    Transfer {
        to: String,
        via: super::transfer::Via,
        reply: oneshot::Sender<Result<TransferId, (u16, String)>>,
    },
    /// The caller's operator `agent` dialled `queue`'s name from their phone: the caller
    /// joins that queue at its front with their wait kept. Answered once the queue took the
    /// caller (`Ok`) or the transfer failed or was refused (the SIP status and why).
    QueueByPhone {
        agent: String,
        queue: String,
        reply: oneshot::Sender<Result<(), (u16, String)>>,
    },
    /// A supervisor joins the caller's bridge ([`super::monitor`]): `Ok` once the media clock
    /// mixes them in, or why not.
    Monitor {
        monitor: MonitorRequest,
        reply: oneshot::Sender<Result<(), (u16, String)>>,
    },
}

/// A supervisor's leg, on its way to the caller's media slot.
pub(crate) struct MonitorRequest(pub(crate) Box<crate::media::clock::Monitor>);

impl std::fmt::Debug for MonitorRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MonitorRequest")
    }
}

/// What a caller's call asks of an operator's consultation ([`super::consult`]).
#[derive(Debug)]
pub(crate) enum ConsultCommand {
    /// Hand the consulted party over (the operator transferred with `Replaces`).
    HandOver {
        reply: oneshot::Sender<Result<Joined, (u16, String)>>,
    },
}

/// A consulted party handed over to the caller's call: the transfer (connected), the
/// target, and its legs' IO.
pub(crate) struct Joined {
    pub(crate) transfer: Box<Transfer>,
    pub(crate) connected: Connected,
    pub(crate) legs: Vec<LegIo>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("transfer", &self.transfer.id)
            .field("legs", &self.legs.len())
            .finish()
    }
}

/// A transfer, as `GET /admin/transfers/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferInfo {
    pub id: TransferId,
    pub call_id: String,
    /// `911`, a `transfers` name, `agent:<id>` or `queue:<name>`.
    pub target: String,
    /// `refer`, `phone_call`, `admin` or `console`.
    pub requested_via: &'static str,
    /// The operator who asked (absent for an admin's transfer of a call with none).
    pub operator: Option<String>,
    /// `claiming`, `calling`, `ringing`, `calling 911`, `queueing`, then the outcome
    /// (`connected`, `failed: ...; back to the operator`...).
    pub state: String,
    /// Where the caller is now.
    pub caller_state: String,
    pub done: bool,
    pub seconds: u64,
    #[serde(skip)]
    started: Instant,
    #[serde(skip)]
    ended: Option<Instant>,
}

/// What the registry knows of a live call (for /health and the admin API).
#[derive(Debug, Clone)]
pub struct CallInfo {
    pub call_id: String,
    pub caller: String,
    pub started: Instant,
    pub rtp_port: u16,
    pub language: String,
    /// The menu the caller is in, or what is happening (`filing`, `emergency`...).
    pub state: String,
    /// Cancelled by an admin to hang the call up.
    pub hangup: CancellationToken,
}

/// Live calls, shared with the HTTP API.
#[derive(Debug, Default)]
pub struct CallRegistry {
    calls: DashMap<u64, CallInfo>,
    /// Each call's command channel.
    commands: DashMap<u64, mpsc::Sender<CallCommand>>,
    /// Operators' consultations from their phones, by the dialog with the phone: the agent
    /// and where the consultation takes commands.
    consults: DashMap<DialogId, (String, mpsc::Sender<ConsultCommand>)>,
    /// Who each call's caller is talking to, with the dialog of the operator's leg.
    operators: DashMap<u64, (OperatorView, Option<DialogId>)>,
    /// Transfers by id, and the finished ones oldest first (to forget them in order).
    transfers: Mutex<(
        std::collections::HashMap<TransferId, TransferInfo>,
        VecDeque<TransferId>,
    )>,
    next: AtomicU64,
    pub completed: AtomicU64,
    pub rejected: AtomicU64,
    /// RTP packets received from callers / sent to them, and keys heard, over finished calls.
    pub rtp_in: AtomicU64,
    pub rtp_out: AtomicU64,
    pub digits: AtomicU64,
}

impl CallRegistry {
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    pub fn snapshot(&self) -> Vec<CallInfo> {
        self.calls.iter().map(|c| c.value().clone()).collect()
    }

    pub(crate) fn insert(&self, info: CallInfo) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.calls.insert(id, info);
        id
    }

    /// The Call-ID of live call `id`.
    pub fn call_id(&self, id: u64) -> Option<String> {
        self.calls.get(&id).map(|c| c.call_id.clone())
    }

    /// Hang up the call with this Call-ID (admin). False if there is none.
    pub fn hangup(&self, call_id: &str) -> bool {
        match self.calls.iter().find(|c| c.value().call_id == call_id) {
            Some(c) => {
                c.value().hangup.cancel();
                true
            }
            None => false,
        }
    }

    /// Hang up the call the registry knows as `id` (the queue's caller id), e.g. for the
    /// operator it is connected to. False if there is none.
    pub fn hangup_id(&self, id: u64) -> bool {
        match self.calls.get(&id) {
            Some(c) => {
                c.hangup.cancel();
                true
            }
            None => false,
        }
    }

    pub(crate) fn update(&self, id: u64, language: &str, state: &str) {
        if let Some(mut c) = self.calls.get_mut(&id) {
            if c.language != language {
                c.language = language.to_owned();
            }
            if c.state != state {
                c.state = state.to_owned();
            }
        }
    }

    /// The registry id of the live call with this Call-ID.
    pub(crate) fn id_of(&self, call_id: &str) -> Option<u64> {
        self.calls
            .iter()
            .find(|c| c.value().call_id == call_id)
            .map(|c| *c.key())
    }

    /// The agent live call `id`'s caller talks to (or is held by).
    pub(crate) fn operator_on(&self, id: u64) -> Option<String> {
        self.operators.get(&id).map(|o| o.value().0.agent.clone())
    }

    /// The token that hangs call `id` up ([`CallRegistry::hangup`]).
    pub(crate) fn hangup_token(&self, id: u64) -> CancellationToken {
        self.calls
            .get(&id)
            .map(|c| c.hangup.clone())
            .unwrap_or_default()
    }

    pub(crate) fn remove(&self, id: u64) {
        self.commands.remove(&id);
        self.operators.remove(&id);
        if self.calls.remove(&id).is_some() {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Who call `id`'s caller talks to now (`dialog`: the operator leg's).
    pub(crate) fn show_operator(
        &self,
        id: u64,
        view: Option<OperatorView>,
        dialog: Option<DialogId>,
    ) {
        match view {
            Some(v) => {
                self.operators.insert(id, (v, dialog));
            }
            None => {
                self.operators.remove(&id);
            }
        }
    }

    /// The caller agent `agent` is talking to (or holding), with its call's registry id and
    /// the operator leg's dialog.
    pub(crate) fn caller_of(&self, agent: &str) -> Option<(u64, OperatorView, Option<DialogId>)> {
        self.operators
            .iter()
            .find(|e| e.value().0.agent == agent)
            .map(|e| (*e.key(), e.value().0.clone(), e.value().1))
    }

    /// Agent `agent`'s consultation on dialog `dialog` takes commands at `tx`.
    pub(crate) fn add_consult(
        &self,
        dialog: DialogId,
        agent: &str,
        tx: mpsc::Sender<ConsultCommand>,
    ) {
        self.consults.insert(dialog, (agent.to_owned(), tx));
    }

    pub(crate) fn remove_consult(&self, dialog: DialogId) {
        self.consults.remove(&dialog);
    }

    /// How many consultations agent `agent` has going.
    pub(crate) fn consults_of(&self, agent: &str) -> usize {
        self.consults
            .iter()
            .filter(|e| e.value().0 == agent)
            .count()
    }

    /// The consultation on `dialog`: its agent and where it takes commands.
    pub(crate) fn consult(
        &self,
        dialog: DialogId,
    ) -> Option<(String, mpsc::Sender<ConsultCommand>)> {
        self.consults.get(&dialog).map(|e| e.value().clone())
    }

    /// Tell call `id` something that needs no answer: waits for room in its channel up to
    /// [`COMMAND_WITHIN`] (a call that ended meanwhile is not told).
    pub(crate) async fn tell(&self, id: u64, cmd: CallCommand) {
        let Some(tx) = self.commands.get(&id).map(|t| t.value().clone()) else {
            return;
        };
        if tokio::time::timeout(COMMAND_WITHIN, tx.send(cmd))
            .await
            .is_err()
        {
            tracing::warn!(call = id, "a call did not take a command in time");
        }
    }

    /// Where call `id` takes commands.
    pub(crate) fn set_commands(&self, id: u64, tx: mpsc::Sender<CallCommand>) {
        self.commands.insert(id, tx);
    }

    /// Ask the call with this Call-ID to transfer its caller to `to`: the transfer's id, or
    /// why not (HTTP status and message; 404 when there is no such call).
    pub async fn transfer(&self, call_id: &str, to: &str) -> Result<TransferId, (u16, String)> {
        self.transfer_via(call_id, to, super::transfer::Via::Admin)
            .await
    }

    /// [`CallRegistry::transfer`], asked for by `via` (the admin API or an operator's console).
    pub(crate) async fn transfer_via(
        &self,
        call_id: &str,
        to: &str,
        via: super::transfer::Via,
    ) -> Result<TransferId, (u16, String)> {
        let tx = self
            .calls
            .iter()
            .find(|c| c.value().call_id == call_id)
            .and_then(|c| self.commands.get(c.key()).map(|t| t.value().clone()))
            .ok_or_else(|| (404, "no such call".to_owned()))?;
        let (reply, rx) = oneshot::channel();
        let gone = || (404, "the call has ended".to_owned());
        tx.send(CallCommand::Transfer {
            to: to.to_owned(),
            via,
            reply,
        })
        .await
        .map_err(|_| gone())?;
        match tokio::time::timeout(COMMAND_WITHIN, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err((503, "the call did not answer in time".to_owned())),
        }
    }

    /// Ask live call `id` to send its caller to the front of `queue`, for their operator
    /// `agent` who dialled the queue's name from their phone: `Ok` once the queue took the
    /// caller, or why not (the SIP status for the phone's call, and why).
    pub(crate) async fn queue_by_phone(
        &self,
        id: u64,
        agent: &str,
        queue: &str,
    ) -> Result<(), (u16, String)> {
        let gone = || (481, "the caller's call has ended".to_owned());
        let tx = self
            .commands
            .get(&id)
            .map(|t| t.value().clone())
            .ok_or_else(gone)?;
        let (reply, rx) = oneshot::channel();
        tx.send(CallCommand::QueueByPhone {
            agent: agent.to_owned(),
            queue: queue.to_owned(),
            reply,
        })
        .await
        .map_err(|_| gone())?;
        match tokio::time::timeout(COMMAND_WITHIN, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err((503, "the caller's call did not answer in time".to_owned())),
        }
    }

    /// Put a supervisor on live call `id`'s bridge: `Ok` once it is mixed in, or why not (the
    /// SIP status and why).
    pub(crate) async fn monitor(
        &self,
        id: u64,
        monitor: MonitorRequest,
    ) -> Result<(), (u16, String)> {
        let gone = || (480, "the call has ended".to_owned());
        let tx = self
            .commands
            .get(&id)
            .map(|t| t.value().clone())
            .ok_or_else(gone)?;
        let (reply, rx) = oneshot::channel();
        tx.send(CallCommand::Monitor { monitor, reply })
            .await
            .map_err(|_| gone())?;
        match tokio::time::timeout(COMMAND_WITHIN, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err((503, "the call did not answer in time".to_owned())),
        }
    }

    /// A transfer's progress changed (or it started).
    pub(crate) fn show_transfer(&self, v: &TransferView) {
        let mut guard = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
        let (all, finished) = &mut *guard;
        let now = Instant::now();
        let entry = all.entry(v.id).or_insert_with(|| TransferInfo {
            id: v.id,
            call_id: v.call_id.clone(),
            target: v.target.clone(),
            requested_via: v.via,
            operator: v.operator.clone(),
            state: String::new(),
            caller_state: String::new(),
            done: false,
            seconds: 0,
            started: now,
            ended: None,
        });
        entry.state = v.state.clone();
        entry.caller_state = v.caller.clone();
        if v.done && !entry.done {
            entry.done = true;
            entry.ended = Some(now);
            finished.push_back(v.id);
            while finished.len() > FINISHED_TRANSFERS {
                if let Some(old) = finished.pop_front() {
                    all.remove(&old);
                }
            }
        }
    }

    /// A transfer as `/admin/transfers/{id}` shows it.
    pub fn transfer_info(&self, id: TransferId) -> Option<TransferInfo> {
        let guard = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = guard.0.get(&id)?.clone();
        let until = t.ended.unwrap_or_else(Instant::now);
        t.seconds = until.saturating_duration_since(t.started).as_secs();
        Some(t)
    }
}
