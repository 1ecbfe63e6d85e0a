//! The UA core, sans-IO: every transaction and dialog, the timers table, and the routing of
//! what comes in (a message, a command from a call, a deadline) to the role that handles it.
//!
//! [`Core`] takes `now` with each input and never reads a clock, sends, spawns or waits: what
//! must happen outside it comes out as [`Action`]s (bytes to send along a flow, a TCP
//! connection to hold open or let go, a listener to wait on, a look-up or connection for the
//! trunk registration), which the driver ([`super::UaCore::run`]) carries out in order. Events
//! for calls go into their bounded channels ([`super::events`]), which never block.
//!
//! This file owns the tables and what every role shares: server and client transactions
//! (carrying out their outputs), the dialog table, requests we send inside a dialog (BYE,
//! re-INVITE, REFER...), and hanging up. The roles' own logic is in their files: inbound
//! requests in [`super::acceptor`], outbound legs in [`super::initiator`], session timers in
//! [`super::session`], agents' REGISTER in [`super::registrar`], the trunk registration in
//! [`super::registration`].

use super::acceptor::Acceptor;
use super::events::{Backlog, DialogEvent, EventSink, LegEvent, Listener};
use super::handle::Command;
use super::initiator::{Initiator, SentInvite};
use super::registrar::Agents;
use super::session::SESSION_REFRESH;
use super::{local_for, AppEvent, DialogId, UaStats, ALLOW, ALLOW_WITH_REGISTER};
use crate::logging::LogConfig;
use crate::metrics::Metrics;
use crate::sip::dialog::{Dialog, DialogState};
use crate::sip::message::{Message, Method, Request, Response, ResponseBuilder};
use crate::sip::session_timer::SessionTimer;
use crate::sip::transaction::{ClientState, ClientTransaction, Output, ServerTransaction};
use crate::sip::transport::Flow;
use crate::sip::trunk::TrunkClient;
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Server transaction key (RFC 3261 §17.2.3): branch, sent-by, and method (ACK matches INVITE).
/// Public only so that the benchmarks (`benches/sip.rs`) can time the per-message lookup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerKey {
    branch: String,
    sent_by: String,
    pub(super) method: Method,
}

impl ServerKey {
    /// The key of the transaction `req` belongs to.
    pub fn of(req: &Request) -> ServerKey {
        let via = req.top_via();
        let method = match &req.method {
            Method::Ack => Method::Invite,
            m => m.clone(),
        };
        let branch = if via.has_rfc3261_branch() {
            via.branch.clone().unwrap_or_default()
        } else {
            // RFC 2543 peers: fall back to the request's identity (§17.2.3, simplified).
            format!(
                "2543|{}|{}|{}|{}",
                req.call_id,
                req.cseq,
                req.from.tag().unwrap_or(""),
                via.raw
            )
        };
        ServerKey {
            branch,
            sent_by: via.sent_by(),
            method,
        }
    }

    /// The key of the INVITE transaction a CANCEL with this key cancels (same branch).
    pub(super) fn invite(&self) -> ServerKey {
        ServerKey {
            method: Method::Invite,
            ..self.clone()
        }
    }
}

/// A server transaction and what its driver needs to carry out its outputs.
///
/// Memory: a UDP transaction outlives its final response by 32 s (timer J for non-INVITE,
/// RFC 6026's timer L for a 2xx to INVITE), so at 8 s calls each live call has about four
/// ended calls' INVITE and BYE transactions lingering beside it (8 per live call measured at
/// 1,500 concurrent). While lingering, a transaction only resends its last response (kept as
/// bytes in [`ServerTransaction`]) to `flow`, and matches ACKs and retransmissions by its key.
/// The parsed request (every header as its own `String`s: about 1.8 KB of heap in 20–30
/// allocations for a typical INVITE) is needed only to build responses, so it is dropped as
/// soon as a final response has been sent ([`Core::apply_server`]). Entries are boxed so
/// that the map's table, which grows by doubling and never shrinks, holds a pointer per bucket
/// rather than the whole entry: unboxed, the table alone was 25 MB (32,768 buckets of ~770
/// bytes) at 1,500 concurrent calls.
pub(super) struct ServerEntry {
    pub(super) tx: ServerTransaction,
    pub(super) flow: Flow,
    /// The request, until a final response has been sent (see above).
    pub(super) request: Option<Box<Request>>,
    pub(super) dialog: Option<DialogId>,
}

/// Client transaction key (RFC 3261 §17.1.3): branch and CSeq method, so that a CANCEL (which
/// reuses its INVITE's branch) is a transaction of its own.
pub(super) type ClientKey = (String, Method);

/// What a client transaction is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientKind {
    /// A request inside a dialog: from [`super::DialogHandle::request`], our BYE, our session
    /// refresh.
    InDialog,
    /// The INVITE of an outbound call ([`super::OutboundHandle::invite`]).
    OutboundInvite,
    /// The CANCEL of an outbound INVITE.
    Cancel,
    /// Our REGISTER to the trunk ([`super::UaCore::with_trunk_registration`]).
    TrunkRegister,
}

pub(super) struct ClientEntry {
    pub(super) tx: ClientTransaction,
    pub(super) flow: Flow,
    pub(super) dialog: Option<DialogId>,
    pub(super) req: u64,
    pub(super) method: Method,
    pub(super) kind: ClientKind,
    /// INVITE only: what we sent, for its CANCEL and the ACK of a non-2xx final.
    pub(super) invite: Option<SentInvite>,
    /// INVITE only: the ACK we sent for each 2xx, by the 2xx's To tag; sent again whenever that
    /// 2xx is retransmitted (the transaction's Accepted state passes those up).
    pub(super) acks: HashMap<String, Bytes>,
}

impl ClientEntry {
    /// A new client transaction's entry (no ACKs sent yet).
    pub(super) fn new(
        tx: ClientTransaction,
        flow: Flow,
        kind: ClientKind,
        method: Method,
        dialog: Option<DialogId>,
    ) -> Self {
        ClientEntry {
            tx,
            flow,
            dialog,
            req: 0,
            method,
            kind,
            invite: None,
            acks: HashMap::new(),
        }
    }
}

pub(super) struct DialogEntry {
    pub(super) dialog: Dialog,
    pub(super) events: EventSink,
    /// The INVITE server transaction that created the dialog (none for outbound calls).
    pub(super) invite: Option<ServerKey>,
    /// The latest INVITE received (initial or re-INVITE), which a 2xx ACK confirms.
    pub(super) last_invite: Option<ServerKey>,
    /// re-INVITE/UPDATE server transactions waiting for the call's answer, by txn number.
    pub(super) reoffers: HashMap<u64, ServerKey>,
    /// Other requests passed up for the call to answer (REFER), by txn number.
    pub(super) requests: HashMap<u64, ServerKey>,
    /// A hang-up asked for before the ACK arrived.
    pub(super) bye_pending: bool,
    /// The body of the ACK being applied, handed on with [`DialogEvent::Confirmed`].
    pub(super) ack_body: Bytes,
    /// The session timer (RFC 4028) of a call we answered, when it asked for one, and when
    /// the UA core next acts on it (our refresh, or the BYE for want of the caller's).
    pub(super) session: Option<SessionTimer>,
    pub(super) session_due: Option<Instant>,
    /// The SDP of our last 2xx, sent again unchanged by a re-INVITE refresh.
    pub(super) local_sdp: Bytes,
    /// An inbound call counted against its source's call limits: the source's address.
    pub(super) counted: Option<std::net::IpAddr>,
}

impl DialogEntry {
    /// A dialog heard by `events`, created by the INVITE transaction `invite` when it is one
    /// we received.
    pub(super) fn new(dialog: Dialog, events: EventSink, invite: Option<ServerKey>) -> Self {
        DialogEntry {
            dialog,
            events,
            last_invite: invite.clone(),
            invite,
            reoffers: HashMap::new(),
            requests: HashMap::new(),
            bye_pending: false,
            ack_body: Bytes::new(),
            session: None,
            session_due: None,
            local_sdp: Bytes::new(),
            counted: None,
        }
    }
}

/// What a deadline on the timers table is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TimerRef {
    Server(u64),
    Client(u64),
    /// An outbound leg's wait for the final response after CANCEL.
    Leg(DialogId),
    /// The registrar's next binding expiry.
    Registrar,
    /// Our registration with the trunk is due for its next REGISTER.
    TrunkRegister,
    /// A dialog's session timer (RFC 4028) is due: refresh, or BYE.
    Session(DialogId),
    /// The per-source call limits' log windows are due for a sweep.
    CallLogSweep,
    /// A closed WebSocket's grace is over (by connection id): its dialogs end.
    LostFlow(u64),
}

/// What the UA core asks its driver to do, in order.
#[derive(Debug)]
pub(super) enum Action {
    /// Send these bytes along the flow.
    Transmit(Flow, Bytes),
    /// A dialog (or a registration) now runs over this flow: keep a TCP connection open
    /// however quiet it is ([`crate::sip::transport::TransportHandle::hold`]).
    Hold(Flow),
    /// No longer keep it open for that dialog.
    Release(Flow),
    /// Wait until this listener of dialog `DialogId` has room, then send [`Command::Room`].
    WaitForRoom(DialogId, Listener),
    /// Hand these events to a listener whose dialog is over, in order, for up to
    /// [`super::events::DRAIN_WITHIN`].
    Drain(Backlog),
    /// Look the trunk's registrar up (every address), then send [`Command::TrunkResolved`].
    ResolveTrunk(String),
    /// Open a TCP connection to the trunk's registrar, then send [`Command::TrunkConnected`].
    ConnectTrunk(SocketAddr),
}

/// The UA core's state (see the module docs).
pub(super) struct Core {
    /// The address put in Contact and Via (see [`Core::local_for`]).
    pub(super) local: SocketAddr,
    /// The address the SIP sockets are bound to: which targets they can reach.
    pub(super) bound: SocketAddr,
    pub(super) user_agent: String,
    /// Where new calls go.
    pub(super) app: mpsc::Sender<AppEvent>,
    /// Where the handles of new dialogs send their commands.
    pub(super) commands: mpsc::Sender<Command>,
    /// Whether a flow can be sent on as it is (UDP, or a TCP connection still open).
    pub(super) is_open: Box<dyn Fn(&Flow) -> bool + Send>,
    pub(super) server: HashMap<ServerKey, (u64, Box<ServerEntry>)>,
    pub(super) server_ids: HashMap<u64, ServerKey>,
    pub(super) client: HashMap<ClientKey, (u64, ClientEntry)>,
    pub(super) client_ids: HashMap<u64, ClientKey>,
    pub(super) dialogs: HashMap<DialogId, DialogEntry>,
    /// (Call-ID, our tag) → dialog, for in-dialog requests and ACKs.
    pub(super) by_local_tag: HashMap<(String, String), DialogId>,
    /// Deadlines, earliest first; an entry whose deadline moved is skipped when it comes up.
    pub(super) timers: BinaryHeap<Reverse<(Instant, TimerRef)>>,
    next_id: u64,
    /// What the driver is to do next.
    actions: VecDeque<Action>,
    pub(super) stats: Arc<UaStats>,
    /// Where dropped and refused requests and backlogged calls are counted.
    pub(super) metrics: Option<Arc<Metrics>>,
    /// How log lines show numbers.
    pub(super) log: LogConfig,
    /// Screening and per-source call limits of inbound requests.
    pub(super) acceptor: Acceptor,
    /// Outbound legs not answered yet, and the trunk's credentials.
    pub(super) initiator: Initiator,
    /// Agents' log-ins.
    pub(super) agents: Agents,
    /// Our registration with the trunk.
    pub(super) trunk: Option<TrunkClient>,
    /// Dialogs whose listener fell too far behind, to be ended ([`Core::end_backlogged`]).
    pub(super) backlogged: Vec<DialogId>,
    /// Closed WebSockets whose dialogs wait for the browser to come back (`lost.rs`).
    pub(super) lost: super::lost::LostFlows,
}

impl Core {
    /// A core that names `local` in Contact and Via, for sockets bound to `bound`; `is_open`
    /// says whether a flow can be sent on as it is.
    pub(super) fn new(
        local: SocketAddr,
        bound: SocketAddr,
        user_agent: String,
        app: mpsc::Sender<AppEvent>,
        commands: mpsc::Sender<Command>,
        is_open: Box<dyn Fn(&Flow) -> bool + Send>,
    ) -> Core {
        Core {
            local,
            bound,
            user_agent,
            app,
            commands,
            is_open,
            server: HashMap::new(),
            server_ids: HashMap::new(),
            client: HashMap::new(),
            client_ids: HashMap::new(),
            dialogs: HashMap::new(),
            by_local_tag: HashMap::new(),
            timers: BinaryHeap::new(),
            next_id: 1,
            actions: VecDeque::new(),
            stats: Arc::new(UaStats::default()),
            metrics: None,
            log: LogConfig::default(),
            acceptor: Acceptor::default(),
            initiator: Initiator::default(),
            agents: Agents::default(),
            trunk: None,
            backlogged: Vec::new(),
            lost: Default::default(),
        }
    }

    // ---- inputs and outputs -------------------------------------------------------------------

    /// A message from the transport, along `flow`.
    pub(super) fn handle_message(&mut self, now: Instant, msg: Message, flow: Flow) {
        match msg {
            Message::Request(req) => self.on_request(req, flow, now),
            Message::Response(resp) => self.on_response(resp, now),
        }
        self.end_backlogged(now);
    }

    /// A command from a call, a handle, or a task the driver ran for us.
    pub(super) fn handle_command(&mut self, now: Instant, c: Command) {
        match c {
            Command::Room { dialog } => self.on_room(dialog),
            Command::Invite(inv) => self.start_outbound(*inv, now),
            Command::TrunkResolved(found) => self.on_trunk_resolved(found, now),
            Command::TrunkConnected(opened) => self.on_trunk_connected(opened, now),
            Command::Hangup { dialog } | Command::Drop { dialog }
                if self.initiator.legs.contains_key(&dialog) =>
            {
                // An outbound call not answered yet: CANCEL it.
                self.cancel_leg(dialog, now)
            }
            Command::Respond {
                dialog,
                code,
                reason,
                headers,
                body,
            } => self.respond_invite(dialog, code, &reason, headers, body, now),
            Command::ReofferAnswer {
                dialog,
                txn,
                code,
                body,
            } => self.answer_reoffer(dialog, txn, code, body, now),
            Command::AnswerRequest {
                dialog,
                txn,
                code,
                headers,
            } => self.answer_request(dialog, txn, code, headers, now),
            Command::Request {
                dialog,
                req,
                method,
                headers,
                body,
            } => self.send_request(dialog, req, method, headers, body, now),
            Command::Hangup { dialog } => self.hangup(dialog, now),
            Command::Drop { dialog } => self.release_dialog(dialog, now),
        }
        self.end_backlogged(now);
    }

    /// The deadlines up to `now` are due.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, r))) = self.timers.pop() else {
                break;
            };
            match r {
                TimerRef::Server(id) => {
                    // Stale heap entries (the deadline moved) are skipped by on_timeout itself.
                    let out = match self.server_entry(id) {
                        Some(e) if e.tx.next_deadline().is_some_and(|d| d <= now) => {
                            e.tx.on_timeout(now)
                        }
                        _ => continue,
                    };
                    self.apply_server(id, out, now);
                }
                TimerRef::Client(id) => {
                    let Some(key) = self.client_ids.get(&id).cloned() else {
                        continue;
                    };
                    let out = match self.client.get_mut(&key) {
                        // An outbound INVITE that is ringing: timer B no longer applies
                        // (§17.1.1.2; see the module docs). Its final response re-arms timers.
                        Some((_, e))
                            if e.kind == ClientKind::OutboundInvite
                                && e.tx.state() == ClientState::Proceeding =>
                        {
                            continue
                        }
                        Some((_, e)) if e.tx.next_deadline().is_some_and(|d| d <= now) => {
                            e.tx.on_timeout(now)
                        }
                        _ => continue,
                    };
                    self.apply_client(id, out, None, now);
                }
                TimerRef::Leg(d) => self.on_cancel_deadline(d, now),
                TimerRef::Registrar => self.on_registrar_timer(now),
                TimerRef::TrunkRegister => self.poll_trunk_registration(now),
                TimerRef::Session(d) => self.on_session_timer(d, now),
                TimerRef::CallLogSweep => self.sweep_call_logs(now),
                TimerRef::LostFlow(conn) => self.on_lost_flow_timer(now, conn),
            }
        }
        self.end_backlogged(now);
    }

    /// When [`Core::handle_timeout`] is next due.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// The next thing for the driver to do.
    pub(super) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Put the table sizes where `/health` and `/metrics` read them.
    pub(super) fn publish_counts(&self) {
        let s = &self.stats;
        s.dialogs.store(self.dialogs.len(), Ordering::Relaxed);
        s.server_transactions
            .store(self.server.len(), Ordering::Relaxed);
        s.client_transactions
            .store(self.client.len(), Ordering::Relaxed);
    }

    pub(super) fn act(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    pub(super) fn transmit(&mut self, flow: Flow, bytes: Bytes) {
        self.actions.push_back(Action::Transmit(flow, bytes));
    }

    pub(super) fn arm(&mut self, at: Instant, timer: TimerRef) {
        self.timers.push(Reverse((at, timer)));
    }

    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The address to name in Via and Contact towards a peer at `remote`.
    pub(super) fn local_for(&self, remote: SocketAddr) -> SocketAddr {
        local_for(self.local, remote)
    }

    /// What `Allow` lists: REGISTER too when agents can log in.
    pub(super) fn allow(&self) -> &'static str {
        if self.agents.registrar.is_some() {
            ALLOW_WITH_REGISTER
        } else {
            ALLOW
        }
    }

    // ---- server transactions ------------------------------------------------------------------

    /// A response to `req` with our `Server` header; a final response to a request outside a
    /// dialog gets a To tag of its own (§8.2.6.2).
    pub(super) fn response(
        &self,
        req: &Request,
        code: u16,
        reason: &str,
        to_tag: Option<&str>,
    ) -> ResponseBuilder {
        let tag;
        let to_tag = match to_tag {
            Some(t) => Some(t),
            None if code > 100 && req.to.tag().is_none() => {
                tag = crate::sip::message::random_token(10);
                Some(tag.as_str())
            }
            None => None,
        };
        ResponseBuilder::new(req, code, reason, to_tag).header("Server", &self.user_agent)
    }

    /// A server transaction for `req` that answers `resp` (with status `code`) at once.
    pub(super) fn new_server_and_respond(
        &mut self,
        key: ServerKey,
        req: Request,
        flow: Flow,
        dialog: Option<DialogId>,
        (code, resp): (u16, Bytes),
        now: Instant,
    ) {
        let id = self.insert_server(key, req, flow, dialog);
        let out = match self.server_entry(id) {
            Some(e) => e.tx.respond(now, code, resp),
            None => return,
        };
        self.apply_server(id, out, now);
    }

    pub(super) fn insert_server(
        &mut self,
        key: ServerKey,
        req: Request,
        flow: Flow,
        dialog: Option<DialogId>,
    ) -> u64 {
        let id = self.next_id();
        let tx = ServerTransaction::new(req.method == Method::Invite, flow.transport.is_reliable());
        self.server_ids.insert(id, key.clone());
        self.server.insert(
            key,
            (
                id,
                Box::new(ServerEntry {
                    tx,
                    flow,
                    request: Some(Box::new(req)),
                    dialog,
                }),
            ),
        );
        id
    }

    pub(super) fn server_entry(&mut self, id: u64) -> Option<&mut ServerEntry> {
        let key = self.server_ids.get(&id)?;
        self.server.get_mut(key).map(|(_, e)| &mut **e)
    }

    /// Carry out a server transaction's outputs.
    pub(super) fn apply_server(&mut self, id: u64, out: Vec<Output>, now: Instant) {
        let Some(key) = self.server_ids.get(&id).cloned() else {
            return;
        };
        for o in out {
            match o {
                Output::Transmit(b) => {
                    if let Some((_, e)) = self.server.get(&key) {
                        let flow = e.flow;
                        self.transmit(flow, b);
                    }
                }
                Output::Acked => {
                    let dialog = self.server.get(&key).and_then(|(_, e)| e.dialog);
                    if let Some(d) = dialog {
                        self.on_dialog_acked(d, now);
                    }
                }
                Output::Timeout(t) => {
                    let dialog = self.server.get(&key).and_then(|(_, e)| e.dialog);
                    if let Some(d) = dialog {
                        // Only the dialog-creating INVITE's timeout ends the call.
                        let is_creator = self
                            .dialogs
                            .get(&d)
                            .is_some_and(|de| de.invite.as_ref() == Some(&key));
                        if is_creator {
                            warn!(timer = ?t, "no ACK for our final response; ending the call");
                            self.dialog_event(d, DialogEvent::Timeout);
                            self.remove_dialog(d);
                        }
                    }
                }
                Output::Terminated => {
                    self.server.remove(&key);
                    self.server_ids.remove(&id);
                    return;
                }
                Output::Deliver => {}
            }
        }
        // After the final response only its bytes are resent: the parsed request can go (see
        // [`ServerEntry`]).
        let deadline = self.server.get_mut(&key).and_then(|(_, e)| {
            if e.tx.is_final() {
                e.request = None;
            }
            e.tx.next_deadline()
        });
        if let Some(at) = deadline {
            self.arm(at, TimerRef::Server(id));
        }
    }

    // ---- dialogs --------------------------------------------------------------------------------

    /// Add a dialog; a TCP connection it runs over stays open while it lasts.
    pub(super) fn insert_dialog(&mut self, d: DialogId, entry: DialogEntry) {
        self.act(Action::Hold(entry.dialog.flow));
        if let Some(old) = self.dialogs.insert(d, entry) {
            self.act(Action::Release(old.dialog.flow));
            if let Some(ip) = old.counted {
                self.acceptor.calls.ended(ip);
            }
        }
    }

    pub(super) fn remove_dialog(&mut self, d: DialogId) {
        if let Some(de) = self.dialogs.remove(&d) {
            self.act(Action::Release(de.dialog.flow));
            if let Some(ip) = de.counted {
                self.acceptor.calls.ended(ip);
            }
            self.drain_later(de.events.into_backlog());
            let k = (de.dialog.call_id, de.dialog.local_tag);
            // Another fork's dialog shares the Call-ID and our tag; only drop our own entry.
            if self.by_local_tag.get(&k) == Some(&d) {
                self.by_local_tag.remove(&k);
            }
        }
    }

    /// The call is done with dialog `d` (or cannot keep up with it): if it is still up, end
    /// it properly (BYE; 500 for an inbound call not answered; CANCEL for an outbound call
    /// not answered).
    pub(super) fn release_dialog(&mut self, d: DialogId, now: Instant) {
        if self.initiator.legs.contains_key(&d) {
            self.cancel_leg(d, now);
            return;
        }
        let state = self.dialogs.get(&d).map(|de| de.dialog.state);
        match state {
            Some(DialogState::Confirmed { acked: true }) => self.send_bye(d, now),
            Some(DialogState::Early) => {
                self.respond_invite(d, 500, "Server Internal Error", vec![], None, now)
            }
            Some(DialogState::Confirmed { acked: false }) => {
                if let Some(de) = self.dialogs.get_mut(&d) {
                    de.bye_pending = true;
                }
            }
            _ => {}
        }
    }

    /// The call hangs dialog `dialog` up: BYE once it is confirmed (after the ACK), 480 to an
    /// inbound call not answered yet.
    pub(super) fn hangup(&mut self, dialog: DialogId, now: Instant) {
        let state = self.dialogs.get(&dialog).map(|de| de.dialog.state);
        match state {
            Some(DialogState::Confirmed { acked: true }) => self.send_bye(dialog, now),
            Some(DialogState::Confirmed { acked: false }) => {
                if let Some(de) = self.dialogs.get_mut(&dialog) {
                    de.bye_pending = true;
                }
            }
            Some(DialogState::Early) => {
                self.respond_invite(dialog, 480, "Temporarily Unavailable", vec![], None, now)
            }
            Some(DialogState::Terminating) | None => {}
        }
    }

    pub(super) fn send_bye(&mut self, d: DialogId, now: Instant) {
        if let Some(de) = self.dialogs.get_mut(&d) {
            de.dialog.state = DialogState::Terminating;
        }
        self.send_request(d, 0, Method::Bye, vec![], None, now);
    }

    /// Send `method` inside dialog `d`; its outcome goes to the call as
    /// [`DialogEvent::RequestOutcome`] with `req`.
    pub(super) fn send_request(
        &mut self,
        d: DialogId,
        req: u64,
        method: Method,
        headers: Vec<(String, String)>,
        body: Option<(String, Bytes)>,
        now: Instant,
    ) {
        let local = self
            .dialogs
            .get(&d)
            .map_or(self.local, |de| self.local_for(de.dialog.flow.remote));
        let Some(de) = self.dialogs.get_mut(&d) else {
            return;
        };
        let mut extra = headers;
        extra.push(("User-Agent".into(), self.user_agent.clone()));
        let (bytes, branch) = de.dialog.request(
            &method,
            local,
            &extra,
            body.as_ref().map(|(ct, b)| (ct.as_str(), b.clone())),
        );
        let flow = de.dialog.flow;
        // A re-INVITE: remember what the ACK of a non-2xx final must repeat.
        let invite =
            (method == Method::Invite).then(|| SentInvite::in_dialog(&de.dialog, &branch, local));
        let (tx, out) = ClientTransaction::new(
            now,
            method == Method::Invite,
            flow.transport.is_reliable(),
            bytes,
        );
        let mut entry = ClientEntry::new(tx, flow, ClientKind::InDialog, method.clone(), Some(d));
        entry.req = req;
        entry.invite = invite;
        self.start_client((branch, method), entry, out);
    }

    /// ACK a 2xx to a re-INVITE we sent (§13.2.2.4). True the first time; a retransmitted 2xx
    /// gets the same ACK again and false.
    fn ack_in_dialog_2xx(&mut self, key: &ClientKey, d: DialogId, resp: &Response) -> bool {
        let tag = resp.to.tag().unwrap_or_default().to_owned();
        let Some((_, e)) = self.client.get(key) else {
            return false;
        };
        let flow = e.flow;
        if let Some(ack) = e.acks.get(&tag).cloned() {
            self.transmit(flow, ack);
            return false;
        }
        let local = self.local_for(flow.remote);
        let Some(de) = self.dialogs.get_mut(&d) else {
            return true;
        };
        // A 2xx to a re-INVITE refreshes the remote target (§12.2.1.2).
        de.dialog.refresh_target(resp);
        let ack = de.dialog.ack(resp.cseq, local, &[]);
        self.transmit(flow, ack.clone());
        if let Some((_, e)) = self.client.get_mut(key) {
            e.acks.insert(tag, ack);
        }
        true
    }

    // ---- client transactions ------------------------------------------------------------------

    /// Register a new client transaction and carry out its first outputs (the request itself).
    /// Kept apart from [`Core::apply_client`] so that sending a request never recurses.
    pub(super) fn start_client(&mut self, key: ClientKey, entry: ClientEntry, out: Vec<Output>) {
        let id = self.next_id();
        let flow = entry.flow;
        let deadline = entry.tx.next_deadline();
        self.client_ids.insert(id, key.clone());
        self.client.insert(key, (id, entry));
        for o in out {
            if let Output::Transmit(b) = o {
                self.transmit(flow, b);
            }
        }
        if let Some(at) = deadline {
            self.arm(at, TimerRef::Client(id));
        }
    }

    fn on_response(&mut self, resp: Response, now: Instant) {
        let Some(branch) = resp.top_via().branch.clone() else {
            return;
        };
        let key = (branch, resp.cseq_method.clone());
        let Some((id, e)) = self.client.get_mut(&key) else {
            debug!(code = resp.code, "response for no transaction dropped");
            return;
        };
        let id = *id;
        let ClientEntry { tx, invite, .. } = e;
        // The ACK of a non-2xx final to an INVITE (§17.1.1.3), built only when needed.
        let out = tx.on_response(now, resp.code, || match invite {
            Some(sent) => sent.build(&Method::Ack, &resp.to.raw),
            None => Bytes::new(),
        });
        self.apply_client(id, out, Some(&resp), now);
    }

    fn apply_client(&mut self, id: u64, out: Vec<Output>, resp: Option<&Response>, now: Instant) {
        let Some(key) = self.client_ids.get(&id).cloned() else {
            return;
        };
        for o in out {
            match o {
                Output::Transmit(b) => {
                    if b.is_empty() {
                        continue;
                    }
                    if let Some((_, e)) = self.client.get(&key) {
                        let flow = e.flow;
                        self.transmit(flow, b);
                    }
                }
                Output::Deliver => {
                    if let Some(resp) = resp {
                        self.on_client_deliver(&key, resp, now);
                    }
                }
                Output::Timeout(_) => self.on_client_timeout(&key, now),
                Output::Terminated => {
                    self.client.remove(&key);
                    self.client_ids.remove(&id);
                    return;
                }
                Output::Acked => {}
            }
        }
        let deadline = self
            .client
            .get(&key)
            .and_then(|(_, e)| e.tx.next_deadline());
        if let Some(at) = deadline {
            self.arm(at, TimerRef::Client(id));
        }
    }

    /// A response the client transaction passes up.
    fn on_client_deliver(&mut self, key: &ClientKey, resp: &Response, now: Instant) {
        let Some((_, e)) = self.client.get(key) else {
            return;
        };
        let (kind, dialog, req, method) = (e.kind, e.dialog, e.req, e.method.clone());
        if kind == ClientKind::TrunkRegister {
            if resp.code >= 200 {
                self.on_trunk_register_final(key, resp, now);
            }
            return;
        }
        let Some(d) = dialog else {
            return;
        };
        match kind {
            ClientKind::Cancel | ClientKind::TrunkRegister => {}
            ClientKind::OutboundInvite => self.on_outbound_response(key, d, resp, now),
            ClientKind::InDialog => {
                if resp.code < 200 {
                    return;
                }
                if method == Method::Invite
                    && resp.code < 300
                    && !self.ack_in_dialog_2xx(key, d, resp)
                {
                    return; // a retransmitted 2xx, ACKed again
                }
                if method == Method::Bye {
                    self.remove_dialog(d);
                } else if req == SESSION_REFRESH {
                    self.on_refresh_outcome(d, resp.code, now);
                } else {
                    self.dialog_event(
                        d,
                        DialogEvent::RequestOutcome {
                            req,
                            method,
                            code: resp.code,
                        },
                    );
                }
            }
        }
    }

    /// A client transaction timed out (timer B or F): a 408 for its user (§8.1.3.1).
    fn on_client_timeout(&mut self, key: &ClientKey, now: Instant) {
        let Some((_, e)) = self.client.get(key) else {
            return;
        };
        let (kind, dialog, req, method) = (e.kind, e.dialog, e.req, e.method.clone());
        if kind == ClientKind::TrunkRegister {
            self.on_trunk_register_timeout(key, now);
            return;
        }
        let Some(d) = dialog else {
            return;
        };
        match kind {
            ClientKind::Cancel | ClientKind::TrunkRegister => debug!("CANCEL got no answer"),
            ClientKind::OutboundInvite => {
                let Some(leg) = self.initiator.legs.remove(&d) else {
                    return;
                };
                let (code, reason) = if leg.state.cancelled() {
                    (487, "Request Terminated")
                } else {
                    (408, "Request Timeout")
                };
                info!(code, "outbound INVITE got no answer");
                self.finish_leg(
                    leg,
                    LegEvent::Failed {
                        code,
                        reason: reason.into(),
                    },
                );
            }
            ClientKind::InDialog => {
                if method == Method::Bye {
                    debug!("BYE got no answer; dialog released");
                    self.remove_dialog(d);
                } else if req == SESSION_REFRESH {
                    self.on_refresh_unanswered(d);
                } else {
                    // As RFC 3261 §8.1.3.1 says: a timeout is a 408 to the TU.
                    self.dialog_event(
                        d,
                        DialogEvent::RequestOutcome {
                            req,
                            method,
                            code: 408,
                        },
                    );
                }
            }
        }
    }
}
