//! The SIP user agent core: one tokio task that owns every transaction and dialog.
//!
//! Inputs: parsed messages from [`crate::sip::transport`], commands from calls
//! ([`DialogHandle`]), and the earliest transaction deadline. Outputs: bytes to the transport,
//! [`AppEvent::Invite`] for each new call, and [`DialogEvent`]s to the call that owns a dialog.
//! All state lives in plain maps owned by this task, so nothing here takes a lock.
//!
//! What it answers by itself:
//! - INVITE: `100 Trying` at once, then hands the call up; the call answers (200 with SDP, 488,
//!   503...) through its [`DialogHandle`]. A 2xx is retransmitted until the ACK (timer G).
//! - CANCEL: `200` for the CANCEL, `487` for the INVITE, and the call hears [`DialogEvent::Cancelled`].
//! - In-dialog: BYE (200), INFO (200, passed up), re-INVITE/UPDATE (passed up, the call answers
//!   with SDP), OPTIONS (200); CSeq going backwards gets 500; unknown dialogs get 481.
//! - Out of dialog: OPTIONS gets 200 (monitoring pings); REGISTER, SUBSCRIBE, MESSAGE... get 405
//!   with `Allow`; methods we do not know get 501.
//! - Retransmitted requests are absorbed by their server transaction (the last response is sent
//!   again), so a retransmitted INVITE never becomes a second call and a retransmitted INFO is
//!   never a second digit.
//!
//! Where we send: responses go back to the source address of the request (the `rport`
//! behaviour of RFC 3581, applied whether or not the client asked), and requests we originate
//! inside a dialog go back along the flow the dialog came in on rather than to the Contact.
//! 311 callers are often behind NAT, where the Contact is a private address; the flow is the one
//! path known to work. The Route set from Record-Route is still honoured in the request.

use crate::sip::dialog::{contact_uri, Dialog, DialogState};
use crate::sip::message::{Header, Message, Method, NameAddr, Request, Response, ResponseBuilder};
use crate::sip::transaction::{ClientTransaction, Output, ServerTransaction};
use crate::sip::transport::{Flow, Inbound, Transport, TransportHandle};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Methods we implement, for `Allow`.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY";

/// Internal dialog id.
pub type DialogId = u64;

/// A new call for the application.
#[derive(Debug)]
pub struct IncomingCall {
    pub handle: DialogHandle,
    pub events: mpsc::Receiver<DialogEvent>,
    pub call_id: String,
    pub from: NameAddr,
    pub to: NameAddr,
    pub request_uri: String,
    pub source: SocketAddr,
    pub transport: Transport,
    /// The SIP address the INVITE arrived on.
    pub local: SocketAddr,
    pub content_type: Option<String>,
    pub body: Bytes,
    pub headers: Vec<Header>,
}

/// Events the UA core raises for the application.
#[derive(Debug)]
pub enum AppEvent {
    Invite(IncomingCall),
}

/// What happens to a dialog, as its call sees it.
#[derive(Debug)]
pub enum DialogEvent {
    /// The ACK for our 2xx arrived.
    Confirmed,
    /// The caller cancelled before we answered (the UA already sent 487).
    Cancelled,
    /// The caller hung up (the UA already answered 200).
    Bye,
    /// A re-INVITE or UPDATE; answer with [`DialogHandle::answer_reoffer`] using `txn`.
    Reoffer {
        txn: u64,
        method: Method,
        content_type: Option<String>,
        body: Bytes,
    },
    /// INFO (the UA already answered 200).
    Info { content_type: String, body: Bytes },
    /// The final response to a request we sent in this dialog (`req` from [`DialogHandle::request`]).
    RequestOutcome { req: u64, method: Method, code: u16 },
    /// A NOTIFY inside the dialog (REFER progress), already answered 200.
    Notify { event: String, body: Bytes },
    /// No ACK came for our 2xx, or a request we sent got no answer: the peer is gone.
    Timeout,
}

/// Commands from a call to the UA core.
#[derive(Debug)]
enum Command {
    Respond {
        dialog: DialogId,
        code: u16,
        reason: String,
        headers: Vec<(String, String)>,
        body: Option<(String, Bytes)>,
    },
    ReofferAnswer {
        dialog: DialogId,
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
    },
    Request {
        dialog: DialogId,
        req: u64,
        method: Method,
        headers: Vec<(String, String)>,
        body: Option<(String, Bytes)>,
    },
    Hangup {
        dialog: DialogId,
    },
    /// The call task is gone: forget the dialog.
    Drop {
        dialog: DialogId,
    },
}

/// A call's handle on its dialog. Cloneable; commands are queued to the UA task.
#[derive(Debug, Clone)]
pub struct DialogHandle {
    pub id: DialogId,
    tx: mpsc::Sender<Command>,
}

impl DialogHandle {
    /// Send a response to the INVITE (18x, 2xx with SDP, or a failure).
    pub async fn respond(
        &self,
        code: u16,
        reason: &str,
        headers: Vec<(String, String)>,
        body: Option<(String, Bytes)>,
    ) {
        let _ = self
            .tx
            .send(Command::Respond {
                dialog: self.id,
                code,
                reason: reason.to_owned(),
                headers,
                body,
            })
            .await;
    }

    /// Answer a re-INVITE/UPDATE.
    pub async fn answer_reoffer(&self, txn: u64, code: u16, body: Option<(String, Bytes)>) {
        let _ = self
            .tx
            .send(Command::ReofferAnswer {
                dialog: self.id,
                txn,
                code,
                body,
            })
            .await;
    }

    /// Send a request inside the dialog (REFER, INFO...); the outcome arrives as
    /// [`DialogEvent::RequestOutcome`] with `req`.
    pub async fn request(
        &self,
        req: u64,
        method: Method,
        headers: Vec<(String, String)>,
        body: Option<(String, Bytes)>,
    ) {
        let _ = self
            .tx
            .send(Command::Request {
                dialog: self.id,
                req,
                method,
                headers,
                body,
            })
            .await;
    }

    /// Hang up: BYE if answered (after the ACK), otherwise nothing more is sent.
    pub async fn hangup(&self) {
        let _ = self.tx.send(Command::Hangup { dialog: self.id }).await;
    }

    /// The call is finished with this dialog (best effort, never blocks).
    pub fn release(&self) {
        let _ = self.tx.try_send(Command::Drop { dialog: self.id });
    }
}

/// Figures for the HTTP API.
#[derive(Debug, Default)]
pub struct UaStats {
    pub dialogs: AtomicUsize,
    pub server_transactions: AtomicUsize,
    pub client_transactions: AtomicUsize,
}

/// Server transaction key (RFC 3261 §17.2.3): branch, sent-by, and method (ACK matches INVITE).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ServerKey {
    branch: String,
    sent_by: String,
    method: Method,
}

impl ServerKey {
    fn of(req: &Request) -> ServerKey {
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
}

struct ServerEntry {
    tx: ServerTransaction,
    flow: Flow,
    request: Request,
    dialog: Option<DialogId>,
}

struct ClientEntry {
    tx: ClientTransaction,
    flow: Flow,
    dialog: Option<DialogId>,
    req: u64,
    method: Method,
}

struct DialogEntry {
    dialog: Dialog,
    events: mpsc::Sender<DialogEvent>,
    /// The INVITE server transaction that created the dialog.
    invite: ServerKey,
    /// The latest INVITE (initial or re-INVITE), which a 2xx ACK confirms.
    last_invite: ServerKey,
    /// re-INVITE/UPDATE server transactions waiting for the call's answer, by txn number.
    reoffers: HashMap<u64, ServerKey>,
    /// A hang-up asked for before the ACK arrived.
    bye_pending: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerRef {
    Server(u64),
    Client(u64),
}

/// The UA core task's state.
pub struct UaCore {
    transport: TransportHandle,
    local: SocketAddr,
    user_agent: String,
    app: mpsc::Sender<AppEvent>,
    cmd_tx: mpsc::Sender<Command>,
    cmd_rx: mpsc::Receiver<Command>,
    server: HashMap<ServerKey, (u64, ServerEntry)>,
    server_ids: HashMap<u64, ServerKey>,
    client: HashMap<String, (u64, ClientEntry)>,
    client_ids: HashMap<u64, String>,
    dialogs: HashMap<DialogId, DialogEntry>,
    by_local_tag: HashMap<(String, String), DialogId>,
    timers: BinaryHeap<Reverse<(Instant, TimerRef)>>,
    next_id: u64,
    stats: Arc<UaStats>,
}

impl UaCore {
    /// `advertised` is the address put in Contact/Via (the bound address, or a configured one).
    pub fn new(
        transport: TransportHandle,
        advertised: SocketAddr,
        user_agent: String,
        app: mpsc::Sender<AppEvent>,
    ) -> UaCore {
        let (cmd_tx, cmd_rx) = mpsc::channel(4096);
        UaCore {
            transport,
            local: advertised,
            user_agent,
            app,
            cmd_tx,
            cmd_rx,
            server: HashMap::new(),
            server_ids: HashMap::new(),
            client: HashMap::new(),
            client_ids: HashMap::new(),
            dialogs: HashMap::new(),
            by_local_tag: HashMap::new(),
            timers: BinaryHeap::new(),
            next_id: 1,
            stats: Arc::new(UaStats::default()),
        }
    }

    pub fn stats(&self) -> Arc<UaStats> {
        self.stats.clone()
    }

    /// Run until cancelled or the transport closes.
    pub async fn run(mut self, mut inbound: mpsc::Receiver<Inbound>, cancel: CancellationToken) {
        loop {
            let deadline = self.timers.peek().map(|Reverse((at, _))| *at);
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                m = inbound.recv() => match m {
                    Some(m) => self.on_inbound(m).await,
                    None => return,
                },
                Some(c) = self.cmd_rx.recv() => self.on_command(c).await,
                _ = sleep => self.on_timers().await,
            }
            self.stats
                .dialogs
                .store(self.dialogs.len(), Ordering::Relaxed);
            self.stats
                .server_transactions
                .store(self.server.len(), Ordering::Relaxed);
            self.stats
                .client_transactions
                .store(self.client.len(), Ordering::Relaxed);
        }
    }

    fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    async fn on_inbound(&mut self, m: Inbound) {
        match m.msg {
            Message::Request(req) => self.on_request(req, m.flow).await,
            Message::Response(resp) => self.on_response(resp).await,
        }
    }

    // ---- server side -------------------------------------------------------------------

    async fn on_request(&mut self, req: Request, flow: Flow) {
        let now = Self::now();
        let key = ServerKey::of(&req);

        if req.method == Method::Ack {
            self.on_ack(&req, &key, now).await;
            return;
        }
        // A retransmission of a request we already have a transaction for.
        if let Some((id, entry)) = self.server.get_mut(&key) {
            let id = *id;
            let out = entry.tx.on_retransmission();
            debug!(call_id = %req.call_id, method = %req.method, "retransmission absorbed");
            self.apply_server(id, out, now).await;
            return;
        }
        if req.method == Method::Cancel {
            self.on_cancel(req, key, flow, now).await;
            return;
        }
        if req.to.tag().is_some() {
            self.on_in_dialog(req, key, flow, now).await;
            return;
        }
        match req.method {
            Method::Invite => self.on_invite(req, key, flow, now).await,
            Method::Options => {
                let resp = self
                    .response(&req, 200, "OK", None)
                    .header("Allow", ALLOW)
                    .header("Accept", "application/sdp")
                    .header("Supported", "")
                    .build();
                self.new_server_and_respond(key, req, flow, None, 200, resp, now)
                    .await;
            }
            Method::Bye | Method::Info | Method::Update | Method::Notify | Method::Prack => {
                // In-dialog methods without a To tag: there is no such dialog.
                let resp = self
                    .response(&req, 481, "Call/Transaction Does Not Exist", None)
                    .build();
                self.new_server_and_respond(key, req, flow, None, 481, resp, now)
                    .await;
            }
            Method::Other(_) => {
                let resp = self
                    .response(&req, 501, "Not Implemented", None)
                    .header("Allow", ALLOW)
                    .build();
                self.new_server_and_respond(key, req, flow, None, 501, resp, now)
                    .await;
            }
            _ => {
                let resp = self
                    .response(&req, 405, "Method Not Allowed", None)
                    .header("Allow", ALLOW)
                    .build();
                self.new_server_and_respond(key, req, flow, None, 405, resp, now)
                    .await;
            }
        }
    }

    fn response(
        &self,
        req: &Request,
        code: u16,
        reason: &str,
        to_tag: Option<&str>,
    ) -> ResponseBuilder {
        // Every final response to a request outside a dialog gets a To tag (§8.2.6.2).
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

    #[allow(clippy::too_many_arguments)]
    async fn new_server_and_respond(
        &mut self,
        key: ServerKey,
        req: Request,
        flow: Flow,
        dialog: Option<DialogId>,
        code: u16,
        resp: Bytes,
        now: Instant,
    ) {
        let id = self.insert_server(key, req, flow, dialog);
        let out = match self.server_entry(id) {
            Some(e) => e.tx.respond(now, code, resp),
            None => return,
        };
        self.apply_server(id, out, now).await;
    }

    fn insert_server(
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
                ServerEntry {
                    tx,
                    flow,
                    request: req,
                    dialog,
                },
            ),
        );
        id
    }

    fn server_entry(&mut self, id: u64) -> Option<&mut ServerEntry> {
        let key = self.server_ids.get(&id)?;
        self.server.get_mut(key).map(|(_, e)| e)
    }

    /// Carry out a server transaction's outputs.
    async fn apply_server(&mut self, id: u64, out: Vec<Output>, now: Instant) {
        let Some(key) = self.server_ids.get(&id).cloned() else {
            return;
        };
        for o in out {
            match o {
                Output::Transmit(b) => {
                    if let Some((_, e)) = self.server.get(&key) {
                        self.transport.send(&e.flow, b).await;
                    }
                }
                Output::Acked => {
                    let dialog = self.server.get(&key).and_then(|(_, e)| e.dialog);
                    if let Some(d) = dialog {
                        self.on_dialog_acked(d, now).await;
                    }
                }
                Output::Timeout(t) => {
                    let dialog = self.server.get(&key).and_then(|(_, e)| e.dialog);
                    if let Some(d) = dialog {
                        // Only the dialog-creating INVITE's timeout ends the call.
                        let is_creator = self.dialogs.get(&d).is_some_and(|de| de.invite == key);
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
        let deadline = self
            .server
            .get(&key)
            .and_then(|(_, e)| e.tx.next_deadline());
        if let Some(at) = deadline {
            self.timers.push(Reverse((at, TimerRef::Server(id))));
        }
    }

    async fn on_ack(&mut self, req: &Request, key: &ServerKey, now: Instant) {
        // ACK for a non-2xx final: same branch as the INVITE.
        if let Some((id, e)) = self.server.get_mut(key) {
            let id = *id;
            let out = e.tx.on_ack(now);
            self.apply_server(id, out, now).await;
            return;
        }
        // ACK for a 2xx: a new transaction, matched to the dialog.
        let Some(tag) = req.to.tag() else { return };
        let Some(&d) = self
            .by_local_tag
            .get(&(req.call_id.clone(), tag.to_owned()))
        else {
            debug!(call_id = %req.call_id, "ACK for no dialog dropped");
            return;
        };
        // The ACK belongs to the dialog's latest INVITE (the initial one or a re-INVITE).
        let Some(invite) = self.dialogs.get(&d).map(|de| de.last_invite.clone()) else {
            return;
        };
        if let Some((id, e)) = self.server.get_mut(&invite) {
            let id = *id;
            let out = e.tx.on_ack(now);
            self.apply_server(id, out, now).await;
        }
    }

    async fn on_dialog_acked(&mut self, d: DialogId, now: Instant) {
        let bye_pending = match self.dialogs.get_mut(&d) {
            Some(de) => {
                de.dialog.state = DialogState::Confirmed { acked: true };
                de.bye_pending
            }
            None => return,
        };
        self.dialog_event(d, DialogEvent::Confirmed);
        if bye_pending {
            self.send_bye(d, now).await;
        }
    }

    async fn on_cancel(&mut self, req: Request, key: ServerKey, flow: Flow, now: Instant) {
        let invite_key = ServerKey {
            method: Method::Invite,
            ..key.clone()
        };
        let found = self
            .server
            .get(&invite_key)
            .map(|(id, e)| (*id, e.tx.is_final(), e.dialog));
        let Some((invite_id, is_final, dialog)) = found else {
            let resp = self
                .response(&req, 481, "Call/Transaction Does Not Exist", None)
                .build();
            self.new_server_and_respond(key, req, flow, None, 481, resp, now)
                .await;
            return;
        };
        let resp = self.response(&req, 200, "OK", None).build();
        self.new_server_and_respond(key, req, flow, None, 200, resp, now)
            .await;
        if is_final {
            return; // too late: the call was already answered (or rejected)
        }
        let local_tag =
            dialog.and_then(|d| self.dialogs.get(&d).map(|de| de.dialog.local_tag.clone()));
        let resp = match self.server_entry(invite_id) {
            Some(e) => {
                let r = ResponseBuilder::new(
                    &e.request,
                    487,
                    "Request Terminated",
                    local_tag.as_deref(),
                )
                .build();
                e.tx.respond(now, 487, r)
            }
            None => return,
        };
        self.apply_server(invite_id, resp, now).await;
        if let Some(d) = dialog {
            info!("caller cancelled before answer");
            self.dialog_event(d, DialogEvent::Cancelled);
            self.remove_dialog(d);
        }
    }

    async fn on_invite(&mut self, req: Request, key: ServerKey, flow: Flow, now: Instant) {
        let d = self.next_id();
        let local_tag = crate::sip::message::random_token(12);
        let dialog = Dialog::from_invite(&req, local_tag.clone(), flow);
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let incoming = IncomingCall {
            handle: DialogHandle {
                id: d,
                tx: self.cmd_tx.clone(),
            },
            events: ev_rx,
            call_id: req.call_id.clone(),
            from: req.from.clone(),
            to: req.to.clone(),
            request_uri: req.uri.clone(),
            source: flow.remote,
            transport: flow.transport,
            local: self.local,
            content_type: req.content_type().map(str::to_owned),
            body: req.body.clone(),
            headers: req.headers.clone(),
        };
        let trying = ResponseBuilder::new(&req, 100, "Trying", None).build();
        let id = self.insert_server(key.clone(), req, flow, Some(d));
        self.by_local_tag
            .insert((dialog.call_id.clone(), local_tag), d);
        self.dialogs.insert(
            d,
            DialogEntry {
                dialog,
                events: ev_tx,
                invite: key.clone(),
                last_invite: key,
                reoffers: HashMap::new(),
                bye_pending: false,
            },
        );
        let out = match self.server_entry(id) {
            Some(e) => e.tx.respond(now, 100, trying),
            None => return,
        };
        self.apply_server(id, out, now).await;
        if let Err(e) = self.app.try_send(AppEvent::Invite(incoming)) {
            warn!("call handler backlogged; answering 503");
            let AppEvent::Invite(inc) = match e {
                mpsc::error::TrySendError::Full(x) | mpsc::error::TrySendError::Closed(x) => x,
            };
            self.respond_invite(
                inc.handle.id,
                503,
                "Service Unavailable",
                vec![("Retry-After".into(), "5".into())],
                None,
                now,
            )
            .await;
        }
    }

    async fn on_in_dialog(&mut self, req: Request, key: ServerKey, flow: Flow, now: Instant) {
        let tag = req.to.tag().unwrap_or_default().to_owned();
        let d = self
            .by_local_tag
            .get(&(req.call_id.clone(), tag))
            .copied()
            .filter(|d| {
                self.dialogs
                    .get(d)
                    .is_some_and(|de| req.from.tag() == Some(de.dialog.remote_tag.as_str()))
            });
        let Some(d) = d else {
            let resp = self
                .response(&req, 481, "Call/Transaction Does Not Exist", None)
                .build();
            self.new_server_and_respond(key, req, flow, None, 481, resp, now)
                .await;
            return;
        };
        let Some(de) = self.dialogs.get_mut(&d) else {
            return;
        };
        let local_tag = de.dialog.local_tag.clone();
        if let Err(e) = de.dialog.check_remote_cseq(req.cseq) {
            let resp = ResponseBuilder::new(&req, 500, "Server Internal Error", None)
                .header("Warning", format_args!("399 ivr311 \"{e}\""))
                .build();
            self.new_server_and_respond(key, req, flow, None, 500, resp, now)
                .await;
            return;
        }
        match req.method.clone() {
            Method::Bye => {
                let resp = self.response(&req, 200, "OK", Some(&local_tag)).build();
                self.new_server_and_respond(key, req, flow, None, 200, resp, now)
                    .await;
                info!("caller hung up");
                self.dialog_event(d, DialogEvent::Bye);
                self.remove_dialog(d);
            }
            Method::Invite | Method::Update => {
                let busy = self.dialogs.get(&d).is_some_and(|de| {
                    !de.reoffers.is_empty()
                        || self
                            .server
                            .get(&de.invite)
                            .is_some_and(|(_, e)| !e.tx.is_final())
                });
                if busy {
                    // An offer is still being answered (§14.2): ask the peer to retry.
                    let resp = ResponseBuilder::new(&req, 500, "Server Internal Error", None)
                        .header("Retry-After", "1")
                        .build();
                    self.new_server_and_respond(key, req, flow, None, 500, resp, now)
                        .await;
                    return;
                }
                if let Some(de) = self.dialogs.get_mut(&d) {
                    de.dialog.refresh_target(&req);
                }
                let ev = DialogEvent::Reoffer {
                    txn: 0,
                    method: req.method.clone(),
                    content_type: req.content_type().map(str::to_owned),
                    body: req.body.clone(),
                };
                let id = self.insert_server(key.clone(), req, flow, Some(d));
                if let Some(de) = self.dialogs.get_mut(&d) {
                    if de.dialog.state != DialogState::Early && key.method == Method::Invite {
                        de.last_invite = key.clone();
                    }
                    de.reoffers.insert(id, key);
                }
                let ev = match ev {
                    DialogEvent::Reoffer {
                        method,
                        content_type,
                        body,
                        ..
                    } => DialogEvent::Reoffer {
                        txn: id,
                        method,
                        content_type,
                        body,
                    },
                    other => other,
                };
                self.dialog_event(d, ev);
            }
            Method::Info | Method::Notify | Method::Options => {
                let resp = self.response(&req, 200, "OK", Some(&local_tag)).build();
                let ev = match req.method {
                    Method::Info => Some(DialogEvent::Info {
                        content_type: req.content_type().unwrap_or_default().to_owned(),
                        body: req.body.clone(),
                    }),
                    Method::Notify => Some(DialogEvent::Notify {
                        event: req.header("Event").unwrap_or_default().to_owned(),
                        body: req.body.clone(),
                    }),
                    _ => None,
                };
                self.new_server_and_respond(key, req, flow, Some(d), 200, resp, now)
                    .await;
                if let Some(ev) = ev {
                    self.dialog_event(d, ev);
                }
            }
            Method::Other(_) => {
                let resp = self
                    .response(&req, 501, "Not Implemented", Some(&local_tag))
                    .header("Allow", ALLOW)
                    .build();
                self.new_server_and_respond(key, req, flow, None, 501, resp, now)
                    .await;
            }
            _ => {
                let resp = self
                    .response(&req, 405, "Method Not Allowed", Some(&local_tag))
                    .header("Allow", ALLOW)
                    .build();
                self.new_server_and_respond(key, req, flow, None, 405, resp, now)
                    .await;
            }
        }
    }

    fn dialog_event(&mut self, d: DialogId, ev: DialogEvent) {
        if let Some(de) = self.dialogs.get(&d) {
            if de.events.try_send(ev).is_err() {
                debug!("call not listening; dialog event dropped");
            }
        }
    }

    fn remove_dialog(&mut self, d: DialogId) {
        if let Some(de) = self.dialogs.remove(&d) {
            self.by_local_tag
                .remove(&(de.dialog.call_id.clone(), de.dialog.local_tag.clone()));
        }
    }

    async fn respond_invite(
        &mut self,
        d: DialogId,
        code: u16,
        reason: &str,
        headers: Vec<(String, String)>,
        body: Option<(String, Bytes)>,
        now: Instant,
    ) {
        let Some(de) = self.dialogs.get(&d) else {
            return;
        };
        let key = de.invite.clone();
        let local_tag = de.dialog.local_tag.clone();
        let flow = de.dialog.flow;
        let Some((id, e)) = self.server.get_mut(&key) else {
            return;
        };
        let id = *id;
        let mut b = ResponseBuilder::new(&e.request, code, reason, Some(&local_tag))
            .header("Server", &self.user_agent);
        if (101..300).contains(&code) {
            b = b
                .header(
                    "Contact",
                    format_args!("<{}>", contact_uri(self.local, flow)),
                )
                .header("Allow", ALLOW)
                .header("Supported", "");
        }
        for (k, v) in headers {
            b = b.header(&k, v);
        }
        if let Some((ct, body)) = body {
            b = b.body(&ct, body);
        }
        let out = e.tx.respond(now, code, b.build());
        if (200..300).contains(&code) {
            if let Some(de) = self.dialogs.get_mut(&d) {
                de.dialog.state = DialogState::Confirmed { acked: false };
            }
        } else if code >= 300 {
            self.remove_dialog(d);
        }
        self.apply_server(id, out, now).await;
    }

    // ---- commands -------------------------------------------------------------------------

    async fn on_command(&mut self, c: Command) {
        let now = Self::now();
        match c {
            Command::Respond {
                dialog,
                code,
                reason,
                headers,
                body,
            } => {
                self.respond_invite(dialog, code, &reason, headers, body, now)
                    .await
            }
            Command::ReofferAnswer {
                dialog,
                txn,
                code,
                body,
            } => {
                let Some(key) = self
                    .dialogs
                    .get_mut(&dialog)
                    .and_then(|de| de.reoffers.remove(&txn))
                else {
                    return;
                };
                let local_tag = self
                    .dialogs
                    .get(&dialog)
                    .map(|de| de.dialog.local_tag.clone())
                    .unwrap_or_default();
                let flow = self.dialogs.get(&dialog).map(|de| de.dialog.flow);
                let local = self.local;
                let ua = self.user_agent.clone();
                let Some((id, e)) = self.server.get_mut(&key) else {
                    return;
                };
                let id = *id;
                let reason = if code < 300 {
                    "OK"
                } else {
                    "Not Acceptable Here"
                };
                let mut b = ResponseBuilder::new(&e.request, code, reason, Some(&local_tag))
                    .header("Server", ua);
                if let (Some(flow), true) = (flow, code < 300) {
                    b = b
                        .header("Contact", format_args!("<{}>", contact_uri(local, flow)))
                        .header("Allow", ALLOW);
                }
                if let Some((ct, body)) = body {
                    b = b.body(&ct, body);
                }
                let out = e.tx.respond(now, code, b.build());
                self.apply_server(id, out, now).await;
            }
            Command::Request {
                dialog,
                req,
                method,
                headers,
                body,
            } => {
                self.send_request(dialog, req, method, headers, body, now)
                    .await
            }
            Command::Hangup { dialog } => {
                let state = self.dialogs.get(&dialog).map(|de| de.dialog.state);
                match state {
                    Some(DialogState::Confirmed { acked: true }) => {
                        self.send_bye(dialog, now).await
                    }
                    Some(DialogState::Confirmed { acked: false }) => {
                        if let Some(de) = self.dialogs.get_mut(&dialog) {
                            de.bye_pending = true;
                        }
                    }
                    Some(DialogState::Early) => {
                        self.respond_invite(
                            dialog,
                            480,
                            "Temporarily Unavailable",
                            vec![],
                            None,
                            now,
                        )
                        .await
                    }
                    Some(DialogState::Terminating) | None => {}
                }
            }
            Command::Drop { dialog } => {
                // The call is gone. If the dialog is still up, end it properly first.
                let state = self.dialogs.get(&dialog).map(|de| de.dialog.state);
                match state {
                    Some(DialogState::Confirmed { acked: true }) => {
                        self.send_bye(dialog, now).await
                    }
                    Some(DialogState::Early) => {
                        self.respond_invite(dialog, 500, "Server Internal Error", vec![], None, now)
                            .await
                    }
                    Some(DialogState::Confirmed { acked: false }) => {
                        if let Some(de) = self.dialogs.get_mut(&dialog) {
                            de.bye_pending = true;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    async fn send_bye(&mut self, d: DialogId, now: Instant) {
        if let Some(de) = self.dialogs.get_mut(&d) {
            de.dialog.state = DialogState::Terminating;
        }
        self.send_request(d, 0, Method::Bye, vec![], None, now)
            .await;
    }

    async fn send_request(
        &mut self,
        d: DialogId,
        req: u64,
        method: Method,
        headers: Vec<(String, String)>,
        body: Option<(String, Bytes)>,
        now: Instant,
    ) {
        let local = self.local;
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
        let (tx, out) = ClientTransaction::new(
            now,
            method == Method::Invite,
            flow.transport.is_reliable(),
            bytes,
        );
        let id = self.next_id();
        self.client_ids.insert(id, branch.clone());
        self.client.insert(
            branch,
            (
                id,
                ClientEntry {
                    tx,
                    flow,
                    dialog: Some(d),
                    req,
                    method,
                },
            ),
        );
        self.apply_client(id, out, None).await;
    }

    // ---- client side ------------------------------------------------------------------------

    async fn on_response(&mut self, resp: Response) {
        let now = Self::now();
        let Some(branch) = resp.top_via().branch.clone() else {
            return;
        };
        let Some((id, e)) = self.client.get_mut(&branch) else {
            debug!(code = resp.code, "response for no transaction dropped");
            return;
        };
        if e.method != resp.cseq_method {
            return;
        }
        let id = *id;
        let out = e.tx.on_response(now, resp.code, Bytes::new);
        self.apply_client(id, out, Some(resp.code)).await;
    }

    async fn apply_client(&mut self, id: u64, out: Vec<Output>, code: Option<u16>) {
        let Some(branch) = self.client_ids.get(&id).cloned() else {
            return;
        };
        for o in out {
            match o {
                Output::Transmit(b) => {
                    if let Some((_, e)) = self.client.get(&branch) {
                        self.transport.send(&e.flow, b).await;
                    }
                }
                Output::Deliver => {
                    let Some(code) = code else { continue };
                    if code < 200 {
                        continue;
                    }
                    let info = self
                        .client
                        .get(&branch)
                        .map(|(_, e)| (e.dialog, e.req, e.method.clone()));
                    if let Some((Some(d), req, method)) = info {
                        if method == Method::Bye {
                            self.remove_dialog(d);
                        } else {
                            self.dialog_event(d, DialogEvent::RequestOutcome { req, method, code });
                        }
                    }
                }
                Output::Timeout(_) => {
                    let info = self
                        .client
                        .get(&branch)
                        .map(|(_, e)| (e.dialog, e.method.clone()));
                    if let Some((Some(d), method)) = info {
                        if method == Method::Bye {
                            debug!("BYE got no answer; dialog released");
                            self.remove_dialog(d);
                        } else {
                            self.dialog_event(d, DialogEvent::Timeout);
                        }
                    }
                }
                Output::Terminated => {
                    self.client.remove(&branch);
                    self.client_ids.remove(&id);
                    return;
                }
                Output::Acked => {}
            }
        }
        let deadline = self
            .client
            .get(&branch)
            .and_then(|(_, e)| e.tx.next_deadline());
        if let Some(at) = deadline {
            self.timers.push(Reverse((at, TimerRef::Client(id))));
        }
    }

    async fn on_timers(&mut self) {
        let now = Self::now();
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
                    self.apply_server(id, out, now).await;
                }
                TimerRef::Client(id) => {
                    let Some(branch) = self.client_ids.get(&id).cloned() else {
                        continue;
                    };
                    let out = match self.client.get_mut(&branch) {
                        Some((_, e)) if e.tx.next_deadline().is_some_and(|d| d <= now) => {
                            e.tx.on_timeout(now)
                        }
                        _ => continue,
                    };
                    self.apply_client(id, out, None).await;
                }
            }
        }
    }
}
