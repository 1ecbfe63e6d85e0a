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
//! - Out of dialog: OPTIONS gets 200 (monitoring pings); SUBSCRIBE, MESSAGE... get 405 with
//!   `Allow`; methods we do not know get 501.
//! - REGISTER (operators logging in): answered by the [`Registrar`] when agents are configured
//!   ([`UaCore::with_registrar`], [`UaCore::with_agents`]; `Allow` then lists REGISTER), else
//!   403. Log-ins and log-outs go out as [`AgentEvent`]s on their own channel
//!   ([`UaCore::agent_events`], so the [`AppEvent`] consumers are untouched), and the preferred
//!   contact of every agent logged in is kept in a shared map ([`UaCore::agent_contacts`]).
//!   Binding expiry rides on the same timer heap as the transactions.
//! - Screening, before any of the above and before any state is made ([`UaCore::with_screening`]):
//!   requests from a known SIP scanner (by `User-Agent`, see [`crate::sip::guard`]) outside a
//!   dialog, INVITEs from sources outside the trunk allow-list, and out-of-dialog requests other
//!   than INVITE and CANCEL past their source's token bucket are dropped without an answer and
//!   counted in `ivr311_sip_requests_dropped_total{reason}`. Requests in an existing dialog are
//!   never screened.
//! - Per-source call limits ([`Screening::max_calls_per_source`], [`Screening::invites_per_second`],
//!   [`guard::CallLimiter`]): a new INVITE from a source that is not a trusted trunk (listed in
//!   `trunks.allow`) is refused with `503` and `Retry-After` when its source already has that
//!   many calls, or is past its INVITE rate. The refusal is stateless (RFC 3261 §8.2.7): no
//!   transaction is kept and the 503 is sent once, not retransmitted, so a flood with a
//!   spoofed source costs no memory and is not amplified; past a bucket of refusals per source
//!   the INVITE is dropped unanswered. Each is counted (`ivr311_sip_invites_limited_total`),
//!   and logged once per source and 10 s, with a summary of the rest.
//! - Retransmitted requests are absorbed by their server transaction (the last response is sent
//!   again), so a retransmitted INVITE never becomes a second call and a retransmitted INFO is
//!   never a second digit.
//! - Extensions: `Require: 100rel` is honoured by sending no provisional but 100; session
//!   timers (RFC 4028) are agreed in our 2xx and kept by this task (refreshes counted, our own
//!   sent, BYE when the caller stops: [`crate::sip::session_timer`]); any other required
//!   extension gets 420.
//! - Our own registration with a trunk (`trunks.register`, [`crate::sip::trunk`]): REGISTERs in
//!   client transactions of their own, refreshed on the timer heap, removed when draining.
//!
//! Events are never dropped. A call (or an outbound leg's owner) reads its [`DialogEvent`]s
//! from a bounded channel; when that channel is full, further events wait in order in a
//! bounded backlog of the dialog (`EventQueue`), and a task (owned by the server's
//! [`TaskTracker`], [`UaCore::with_tasks`]) waits for room and has the UA core deliver them.
//! A call more than [`MAX_EVENT_BACKLOG`] events behind cannot keep up: its dialog is ended
//! as if the call had released it (BYE, or 500 before the answer, CANCEL for an outbound leg
//! not answered), counted in `ivr311_calls_ended_backlogged_total`, and the call, once it has
//! read what was queued, finds its channel closed. When a dialog ends with events still
//! queued (a BYE behind a burst of INFOs), a task hands them over in order (for up to 30 s)
//! before the channel closes.
//!
//! Where we send: responses go back to the source address of the request (the `rport`
//! behaviour of RFC 3581, applied whether or not the client asked), and requests we originate
//! inside a dialog go back along the flow the dialog came in on rather than to the Contact.
//! 311 callers are often behind NAT, where the Contact is a private address; the flow is the one
//! path known to work. The Route set from Record-Route is still honoured in the request.
//!
//! Outbound calls (UAC), for bridging a caller to 911 or an operator: [`OutboundHandle::invite`]
//! sends an INVITE over UDP to a `sip:` URI (an IP literal, or a host name the caller's task
//! looks up first: [`crate::sip::resolve`]) and reports progress as
//! [`LegEvent`]s; [`OutboundHandle::invite_via`] sends it along a given flow instead (an agent's
//! registration flow, which reaches phones behind NAT). On the first 2xx the UA builds the UAC dialog ([`Dialog::from_uac`]), ACKs it
//! itself (and ACKs every retransmission of that 2xx again), and from then on the dialog is
//! handled exactly like an inbound one: the same [`DialogHandle`], the same in-dialog requests,
//! with each [`DialogEvent`] wrapped in [`LegEvent::Dialog`]. Non-2xx finals are ACKed by the
//! INVITE client transaction. Hanging up (or releasing) a leg that has not been answered CANCELs
//! it (RFC 3261 §9.1: only once a provisional response has arrived; if none has, the CANCEL
//! waits for the first one); a 2xx that crosses the CANCEL is ACKed and then BYEd. Further 2xx
//! from other forks (other To tags) are ACKed and BYEd too.
//!
//! Ringing has no time limit here: RFC 3261 §17.1.1.2 stops timer B once a provisional response
//! has arrived, and although our INVITE client transaction keeps it armed in Proceeding, the UA
//! does not let it fire for an outbound leg that is ringing. How long to let a leg ring is the
//! caller's decision ([`OutboundHandle::cancel`]). After a CANCEL the UA waits 64·T1 for the
//! INVITE's final response, then gives up and reports [`LegEvent::Failed`] with 487.
//!
//! Memory. Over UDP a server transaction lingers 32 s after its final response (timers J and
//! L), so with 8 s calls there are about 8 server transactions per live call (the INVITE and
//! BYE of ~4 ended calls), which made the UA the largest per-call consumer: measured at 1,500
//! concurrent calls (`ivr311-load --spawn-server --concurrent 1500 --duration 70 --threads 2`),
//! 25 MB for the unboxed transaction table and ~1.8 KB of parsed request per transaction.
//! Now a lingering transaction keeps only its boxed state, key, flow and the exact bytes of
//! its last response (see [`ServerEntry`], [`crate::sip::transaction`]); the server's RSS per
//! live call beyond idle went from 96 KiB to 48 KiB in that run. The allocator is left at
//! glibc's defaults on purpose: after this change about a third of the remainder is free
//! memory glibc keeps in the worker threads' arenas (mallinfo2: ~24 MB at 1,500 calls, flat
//! after the first 45 s), and what would return it cost more than it saves: a periodic
//! `malloc_trim(0)` saved 7 KiB per call but held each arena's lock for 2–45 ms per call of it
//! (stalling SIP and the call tasks), `M_ARENA_MAX=1` saved ~3 KiB, and fixed trim/mmap
//! thresholds nothing measurable.

use crate::metrics::Metrics;
use crate::sip::dialog::{contact_uri, Dialog, DialogState};
use crate::sip::guard::{self, CallLimiter, CallVerdict, IpNet, LogVerdict, RateLimiter};
use crate::sip::message::{
    new_branch, random_token, sanitize_quoted, uri_socket_addr, uri_transport, wants_tcp, Header,
    Message, Method, NameAddr, Request, RequestBuilder, Response, ResponseBuilder,
};
use crate::sip::registrar::{AgentEvent, AgentSecret, Registrar, TrunkCredentials};
use crate::sip::resolve::Resolver;
use crate::sip::session_timer::{self, SessionTimer};
use crate::sip::transaction::{ClientState, ClientTransaction, Output, ServerTransaction, T1};
use crate::sip::transport::{Flow, Inbound, Transport, TransportHandle};
use crate::sip::trunk::{Network, RegisterConfig, RegistrationStatus, TrunkClient, TrunkNeed};
use bytes::Bytes;
use dashmap::DashMap;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// The summary line of a log window of refused calls that ended with refusals unlogged.
fn log_calls_suppressed(s: &guard::Suppressed) {
    let from = s.from();
    let secs = s.over.as_secs_f64().round() as u64;
    warn!(
        source = %from,
        suppressed = s.count,
        "{} more calls from {from} refused by per-source limits in the last {secs}s",
        s.count
    );
}

/// The `req` number of the UA core's own session refreshes (RFC 4028), whose outcomes it keeps
/// (calls number theirs from 0 up).
const SESSION_REFRESH: u64 = u64::MAX;

/// Methods we implement, for `Allow`.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY";
/// `Allow` when agents can log in (a registrar is configured).
pub const ALLOW_WITH_REGISTER: &str =
    "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY, REGISTER";

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
    /// The ACK for our 2xx arrived. `sdp`: its body, which is the answer when our 2xx carried
    /// the offer (to an INVITE or re-INVITE that had none, RFC 3261 §13.2.1 and §14); empty
    /// otherwise.
    Confirmed { sdp: Bytes },
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
    /// No ACK came for our 2xx to the dialog's INVITE: the peer is gone. (A request we send in
    /// a dialog that gets no answer is a [`DialogEvent::RequestOutcome`] with code 408.)
    Timeout,
}

/// What happens to an outbound call (UAC leg), as its owner sees it.
#[derive(Debug)]
pub enum LegEvent {
    /// A provisional response other than 100 (180 Ringing, 183 Session Progress...). `sdp`:
    /// its SDP body, if it has one: the far end's early media (RFC 3960) goes there.
    Provisional { code: u16, sdp: Option<Bytes> },
    /// A 2xx answered the INVITE; the UA has already ACKed it. `sdp` is the 2xx body (the answer).
    Answered { sdp: Bytes },
    /// The call did not happen: the final non-2xx response (already ACKed), 408 when nothing
    /// answered (timer B), 487 after a CANCEL (also when a 2xx crossed the CANCEL: that dialog
    /// is ACKed and BYEd at once), 503 when the target could not be used or reached.
    Failed { code: u16, reason: String },
    /// After [`LegEvent::Answered`]: what happens in the dialog, exactly as for inbound calls
    /// (Bye, Info, Notify, Reoffer, RequestOutcome...).
    Dialog(DialogEvent),
}

/// An outbound call just started by [`OutboundHandle::invite`].
#[derive(Debug)]
pub struct OutboundCall {
    /// The leg's handle: `hangup` CANCELs while ringing and BYEs once answered; `request`,
    /// `answer_reoffer` and `release` work as for inbound dialogs once answered. `release`
    /// CANCELs a leg that has not been answered yet.
    pub handle: DialogHandle,
    pub events: mpsc::Receiver<LegEvent>,
}

/// Starts outbound calls through the UA core. Cloneable; get one from [`UaCore::outbound`].
#[derive(Debug, Clone)]
pub struct OutboundHandle {
    tx: mpsc::Sender<Command>,
    /// Our SIP socket's address: a target's host name is looked up in its family.
    bound: SocketAddr,
    /// Looks a target's host name up ([`UaCore::with_resolver`]).
    resolver: Resolver,
    /// Opens the TCP connection a `transport=tcp` target asks for.
    transport: TransportHandle,
    /// How log lines show a target's user part (a call-back's is the caller's number).
    log: crate::logging::LogConfig,
}

impl OutboundHandle {
    /// Send an INVITE with our SDP offer `sdp` to `target`, a `sip:` URI whose host is an IP
    /// literal or a name (e.g. `sip:911@127.0.0.1:5080`, `sip:911@psap.example.gov`; no port
    /// means 5060). A name is looked up first (A/AAAA, see [`crate::sip::resolve`]); one that
    /// does not resolve fails at once with [`LegEvent::Failed`] 503. A target with
    /// `;transport=tcp` (a PSAP's ESInet border, a carrier that takes TCP only) goes over a TCP
    /// connection we open ([`TransportHandle::connect_tcp`]); one that cannot be opened within
    /// 2 s fails the same way.
    ///
    /// From is `"<from_display>" <sip:<from_user>@<our address>>;tag=...`, so that the far end
    /// (a 911 centre) sees the caller's number; `from_user` is %-escaped where needed and the
    /// display name stripped of quotes and control characters. `extra_headers` (e.g.
    /// `P-Asserted-Identity`, `X-311-*`) are added as given, minus control characters; headers
    /// the UA writes itself (Via, From, To, Call-ID, CSeq, Contact, Route, Max-Forwards,
    /// Content-*, User-Agent) and names that are not tokens are refused with a warning.
    ///
    /// The leg rings for as long as the far end lets it: use [`OutboundHandle::cancel`] (or
    /// [`DialogHandle::hangup`]) to give up. If the UA core has stopped, the returned events
    /// hold a single `Failed { code: 503 }`.
    pub async fn invite(
        &self,
        target: &str,
        from_user: &str,
        from_display: Option<&str>,
        extra_headers: Vec<(String, String)>,
        sdp: Bytes,
    ) -> OutboundCall {
        self.start(
            target,
            None,
            None,
            from_user,
            from_display,
            extra_headers,
            sdp,
        )
        .await
    }

    /// Where an INVITE to `target` may go, in the order to try: its IP literal, or its host
    /// name's addresses in our SIP socket's family ([`Resolver::resolve_all`]). The
    /// 911 bridge and the call-back ask first, to offer media in the far end's address family,
    /// then hand one address to [`OutboundHandle::invite_to`] so a name is looked up once (and
    /// the bridge tries the next address when that one is down).
    pub async fn destinations(&self, target: &str) -> Result<Vec<SocketAddr>, String> {
        self.resolver.resolve_all(target.trim(), self.bound).await
    }

    /// [`OutboundHandle::invite`] to a `destination` [`OutboundHandle::destinations`] gave
    /// for `target` (a failed lookup fails the call at once with 503, as there).
    pub async fn invite_to(
        &self,
        target: &str,
        destination: Result<SocketAddr, String>,
        from_user: &str,
        from_display: Option<&str>,
        extra_headers: Vec<(String, String)>,
        sdp: Bytes,
    ) -> OutboundCall {
        self.start(
            target,
            None,
            Some(destination),
            from_user,
            from_display,
            extra_headers,
            sdp,
        )
        .await
    }

    /// Like [`OutboundHandle::invite`], but the INVITE goes along `flow` instead of to the
    /// target's host: for an agent's phone, pass the contact and flow from its registration
    /// ([`AgentEvent::LoggedIn`], [`UaCore::agent_contacts`]). Phones behind NAT register a
    /// private Contact; the flow (the address and port, or the TCP connection, the REGISTER
    /// came from) is the path that reaches them. `target` is only the Request-URI (and To): any
    /// `sip:`/`sips:` URI, its host need not be an IP address. A flow the UA cannot use (IPv6
    /// while SIP is bound to IPv4, port 0...) fails at once with 503; a TCP connection that has
    /// closed shows as no answer (408).
    pub async fn invite_via(
        &self,
        target: &str,
        flow: Flow,
        from_user: &str,
        from_display: Option<&str>,
        extra_headers: Vec<(String, String)>,
        sdp: Bytes,
    ) -> OutboundCall {
        self.start(
            target,
            Some(flow),
            None,
            from_user,
            from_display,
            extra_headers,
            sdp,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        target: &str,
        via: Option<Flow>,
        looked_up: Option<Result<SocketAddr, String>>,
        from_user: &str,
        from_display: Option<&str>,
        extra_headers: Vec<(String, String)>,
        sdp: Bytes,
    ) -> OutboundCall {
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let (reply_tx, reply_rx) = oneshot::channel();
        // A host name is looked up here, in the caller's task: the UA task never waits on DNS
        // (nor on a TCP connection being opened).
        let prepared = async {
            let name = crate::sip::resolve::needs_lookup(target.trim());
            let resolved = match looked_up {
                // An IP literal, or a name found.
                Some(Ok(a)) => Some(a),
                Some(Err(why)) if name => return Err(why),
                // Not a name: the checks below say what is wrong with the target.
                Some(Err(_)) => None,
                None if via.is_none() && name => {
                    Some(self.resolver.resolve(target.trim(), self.bound).await?)
                }
                None => None,
            };
            let via = match via {
                None if wants_tcp(target) => {
                    let remote = resolved
                        .or_else(|| uri_socket_addr(target.trim()))
                        .ok_or("target host is not an IP address or a name")?;
                    let flow = self
                        .transport
                        .connect_tcp(remote)
                        .await
                        .map_err(|e| format!("TCP to {remote}: {e}"))?;
                    Some(flow)
                }
                via => via,
            };
            Ok::<_, String>((resolved, via))
        };
        let (resolved, via) = match prepared.await {
            Ok(p) => p,
            Err(why) => {
                warn!(target = %self.log.uri(target), %why, "outbound call refused");
                let _ = ev_tx.try_send(LegEvent::Failed {
                    code: 503,
                    reason: why,
                });
                return OutboundCall {
                    handle: DialogHandle {
                        id: 0,
                        tx: self.tx.clone(),
                    },
                    events: ev_rx,
                };
            }
        };
        let cmd = Command::Invite(Box::new(InviteCommand {
            target: target.to_owned(),
            via,
            resolved,
            from_user: from_user.to_owned(),
            from_display: from_display.map(str::to_owned),
            headers: extra_headers,
            sdp,
            events: ev_tx.clone(),
            reply: reply_tx,
        }));
        let id = match self.tx.send(cmd).await {
            Ok(()) => reply_rx.await.ok(),
            Err(_) => None,
        };
        let id = id.unwrap_or_else(|| {
            let _ = ev_tx.try_send(LegEvent::Failed {
                code: 503,
                reason: "SIP stack stopped".into(),
            });
            0
        });
        OutboundCall {
            handle: DialogHandle {
                id,
                tx: self.tx.clone(),
            },
            events: ev_rx,
        }
    }

    /// Cancel the outbound call `id` (its [`DialogHandle::id`]) if it has not been answered yet:
    /// CANCEL with the INVITE's branch, once a provisional response has arrived; the 487 that
    /// follows is ACKed by the transaction and reported as `Failed { code: 487 }`. If a 2xx
    /// crosses the CANCEL, the UA ACKs it, BYEs it, and still reports `Failed { code: 487 }`.
    /// If `Answered` has already been reported, this hangs the call up (BYE), like
    /// [`DialogHandle::hangup`].
    pub async fn cancel(&self, id: DialogId) {
        let _ = self.tx.send(Command::Hangup { dialog: id }).await;
    }
}

/// An outbound INVITE to start (boxed in [`Command`]).
#[derive(Debug)]
struct InviteCommand {
    target: String,
    /// Send along this flow instead of to the target's host ([`OutboundHandle::invite_via`]).
    via: Option<Flow>,
    /// The address the target's host name was looked up to.
    resolved: Option<SocketAddr>,
    from_user: String,
    from_display: Option<String>,
    headers: Vec<(String, String)>,
    sdp: Bytes,
    events: mpsc::Sender<LegEvent>,
    reply: oneshot::Sender<DialogId>,
}

/// Commands from a call to the UA core.
#[derive(Debug)]
enum Command {
    /// Start an outbound call.
    Invite(Box<InviteCommand>),
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
    /// The trunk registrar's host name was looked up: its addresses, in order.
    TrunkResolved(Result<Vec<SocketAddr>, String>),
    /// The TCP connection to the trunk registrar was opened (or could not be).
    TrunkConnected(Result<Flow, String>),
    /// Dialog `dialog`'s listener has room for the events queued for it.
    Room {
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

    /// Hang up: BYE if answered (after the ACK). For an inbound call not answered yet, 480; for
    /// an outbound call not answered yet, CANCEL (see [`OutboundHandle::cancel`]).
    pub async fn hangup(&self) {
        let _ = self.tx.send(Command::Hangup { dialog: self.id }).await;
    }

    /// The call is finished with this dialog (best effort, never blocks). A dialog still up is
    /// ended properly (BYE; 500 for an inbound call not answered; CANCEL for an outbound call
    /// not answered).
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
    /// Calls and outbound legs ended because they fell too far behind their events.
    pub ended_backlogged: std::sync::atomic::AtomicU64,
    /// Agents locked out by the registrar's back-off, as of its last REGISTER.
    locks: std::sync::Mutex<Vec<crate::sip::registrar::AccountLock>>,
    /// Our registration with the trunk, as of the instant stored with it (`None` without
    /// `trunks.register`). Read it with [`UaStats::trunk_registration`].
    trunk: std::sync::Mutex<Option<(Instant, RegistrationStatus)>>,
    /// Beaten on every turn of the UA loop, and at least every [`UA_HEARTBEAT`] when idle
    /// (read by `/health/ready`).
    pub heartbeat: crate::heartbeat::Heartbeat,
}

/// How often an idle UA loop turns anyway, to show it still would.
pub const UA_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(250);
/// An agent's log-ins refused for repeated failures ([`UaStats::login_locks`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoginLock {
    pub agent: String,
    /// Seconds left while log-ins from addresses the agent has not used are refused.
    pub new_sources_seconds: Option<u64>,
    /// Seconds left while log-ins from its usual addresses are refused too.
    pub usual_sources_seconds: Option<u64>,
}

impl UaStats {
    /// The agents whose log-ins are locked now ([`crate::sip::registrar`]'s back-off).
    pub fn login_locks(&self) -> Vec<LoginLock> {
        let now = Instant::now();
        let left = |t: Option<Instant>| {
            t.filter(|t| *t > now)
                .map(|t| t.saturating_duration_since(now).as_secs().max(1))
        };
        let guard = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .iter()
            .map(|l| LoginLock {
                agent: l.agent.clone(),
                new_sources_seconds: left(l.new_sources_until),
                usual_sources_seconds: left(l.usual_sources_until),
            })
            .filter(|l| l.new_sources_seconds.is_some() || l.usual_sources_seconds.is_some())
            .collect()
    }

    /// Our registration with the trunk (`trunks.register`) as it stands now.
    pub fn trunk_registration(&self) -> Option<RegistrationStatus> {
        let guard = self.trunk.lock().unwrap_or_else(|e| e.into_inner());
        let (at, status) = guard.as_ref()?;
        Some(status.aged(at.elapsed().as_secs()))
    }
}

/// Server transaction key (RFC 3261 §17.2.3): branch, sent-by, and method (ACK matches INVITE).
/// Public only so that the benchmarks (`benches/sip.rs`) can time the per-message lookup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerKey {
    branch: String,
    sent_by: String,
    method: Method,
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
/// soon as a final response has been sent ([`UaCore::apply_server`]). Entries are boxed so
/// that the map's table, which grows by doubling and never shrinks, holds a pointer per bucket
/// rather than the whole entry: unboxed, the table alone was 25 MB (32,768 buckets of ~770
/// bytes) at 1,500 concurrent calls.
struct ServerEntry {
    tx: ServerTransaction,
    flow: Flow,
    /// The request, until a final response has been sent (see above).
    request: Option<Box<Request>>,
    dialog: Option<DialogId>,
}

/// Client transaction key (RFC 3261 §17.1.3): branch and CSeq method, so that a CANCEL (which
/// reuses its INVITE's branch) is a transaction of its own.
type ClientKey = (String, Method);

/// What a client transaction is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    /// A request inside a dialog: from [`DialogHandle::request`], or our BYE.
    InDialog,
    /// The INVITE of an outbound call ([`OutboundHandle::invite`]).
    OutboundInvite,
    /// The CANCEL of an outbound INVITE.
    Cancel,
    /// Our REGISTER to the trunk ([`UaCore::with_trunk_registration`]).
    TrunkRegister,
}

struct ClientEntry {
    tx: ClientTransaction,
    flow: Flow,
    dialog: Option<DialogId>,
    req: u64,
    method: Method,
    kind: ClientKind,
    /// INVITE only: what we sent, for its CANCEL and the ACK of a non-2xx final.
    invite: Option<SentInvite>,
    /// INVITE only: the ACK we sent for each 2xx, by the 2xx's To tag; sent again whenever that
    /// 2xx is retransmitted (the transaction's Accepted state passes those up).
    acks: HashMap<String, Bytes>,
}

/// The parts of an INVITE we sent that its CANCEL (§9.1) and the ACK of a non-2xx final
/// (§17.1.1.3) repeat: Request-URI, Via branch, From, Call-ID, CSeq number, Route.
#[derive(Debug, Clone)]
struct SentInvite {
    uri: String,
    branch: String,
    transport: Transport,
    local: SocketAddr,
    /// The whole From value, with our tag.
    from: String,
    /// The INVITE's To (no tag for an initial INVITE).
    to: String,
    call_id: String,
    cseq: u32,
    routes: Vec<String>,
    /// Our From URI and tag, for the UAC dialog a 2xx creates.
    local_uri: String,
    local_tag: String,
}

impl SentInvite {
    /// CANCEL (with the INVITE's To) or the ACK of a non-2xx final (with the response's To).
    fn build(&self, method: &Method, to: &str) -> Bytes {
        let mut b = RequestBuilder::new(
            method,
            &self.uri,
            self.transport.via_name(),
            self.local,
            &self.branch,
        );
        for r in &self.routes {
            b = b.header("Route", r);
        }
        b.header("From", &self.from)
            .header("To", to)
            .header("Call-ID", &self.call_id)
            .header("CSeq", format_args!("{} {}", self.cseq, method))
            .build()
    }
}

/// An outbound call between its INVITE and the first final response.
struct OutboundLeg {
    events: EventQueue<LegEvent>,
    /// The INVITE client transaction.
    invite: ClientKey,
    /// What a digest challenge to the INVITE is answered with, once (trunk legs only).
    auth: Option<Box<AuthRetry>>,
    state: LegState,
    /// After a CANCEL: when to stop waiting for the INVITE's final response (64·T1, §9.1).
    cancel_deadline: Option<Instant>,
}

/// How to send an outbound INVITE again with credentials.
#[derive(Debug)]
struct AuthRetry {
    creds: TrunkCredentials,
    flow: Flow,
    headers: Vec<(String, String)>,
    sdp: Bytes,
    /// Credentials went once already: only a `stale=true` challenge (the nonce expired in
    /// between, RFC 7616 §3.3) is answered again, once.
    answered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegState {
    /// INVITE sent, no response yet.
    Calling,
    /// A provisional response arrived.
    Proceeding,
    /// Cancelled before any provisional response: the CANCEL goes out with the first one.
    CancelPending,
    /// CANCEL sent; waiting for the INVITE's final response.
    Cancelling,
}

impl LegState {
    fn cancelled(self) -> bool {
        matches!(self, LegState::CancelPending | LegState::Cancelling)
    }
}

/// Most events a dialog's listener may be behind beyond its channel; one more and the call
/// is ended (see the module docs).
pub const MAX_EVENT_BACKLOG: usize = 64;
/// How long the events queued for a dialog that has ended wait for its listener to take them.
const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Events for one listener, in order: into its channel while there is room, else into a
/// bounded backlog that [`Command::Room`] flushes.
struct EventQueue<T> {
    tx: mpsc::Sender<T>,
    backlog: VecDeque<T>,
    /// A task waits for room in the channel.
    waiting: bool,
    /// The listener fell [`MAX_EVENT_BACKLOG`] behind; its dialog is being ended and later
    /// events are not queued.
    overflowed: bool,
}

/// What became of an event given to an [`EventQueue`].
#[derive(Debug, PartialEq, Eq)]
enum Queued {
    /// In the channel, or queued behind others (with a task waiting for room).
    Taken,
    /// Queued, and a task must now wait for room ([`UaCore::wait_for_room`]).
    NeedsWaiter,
    /// Queued last: the listener is too far behind, its dialog must end.
    Overflow,
    /// The listener is gone (or the dialog is being ended for its backlog): dropped.
    Gone,
}

impl<T> EventQueue<T> {
    fn new(tx: mpsc::Sender<T>) -> Self {
        EventQueue {
            tx,
            backlog: VecDeque::new(),
            waiting: false,
            overflowed: false,
        }
    }

    fn push(&mut self, ev: T) -> Queued {
        if self.overflowed || self.tx.is_closed() {
            return Queued::Gone;
        }
        if self.backlog.is_empty() {
            match self.tx.try_send(ev) {
                Ok(()) => return Queued::Taken,
                Err(mpsc::error::TrySendError::Closed(_)) => return Queued::Gone,
                Err(mpsc::error::TrySendError::Full(ev)) => self.backlog.push_back(ev),
            }
        } else {
            self.backlog.push_back(ev);
        }
        if self.backlog.len() > MAX_EVENT_BACKLOG {
            self.overflowed = true;
            return Queued::Overflow;
        }
        if self.waiting {
            Queued::Taken
        } else {
            self.waiting = true;
            Queued::NeedsWaiter
        }
    }

    /// Move what fits from the backlog into the channel; whether some is left (and a task must
    /// wait for room again).
    fn flush(&mut self) -> bool {
        self.waiting = false;
        while let Some(ev) = self.backlog.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.backlog.push_front(ev);
                    self.waiting = true;
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    return false;
                }
            }
        }
        false
    }
}

/// Who hears a dialog's events.
enum EventSink {
    /// An inbound call.
    Call(EventQueue<DialogEvent>),
    /// An outbound leg: events are wrapped in [`LegEvent::Dialog`].
    Leg(EventQueue<LegEvent>),
    /// Nobody: a dialog kept only to end it (a 2xx that crossed our CANCEL, another fork).
    Detached,
}

impl EventSink {
    fn push(&mut self, ev: DialogEvent) -> Queued {
        match self {
            EventSink::Call(q) => q.push(ev),
            EventSink::Leg(q) => q.push(LegEvent::Dialog(ev)),
            EventSink::Detached => Queued::Taken,
        }
    }
}

struct DialogEntry {
    dialog: Dialog,
    events: EventSink,
    /// The INVITE server transaction that created the dialog (none for outbound calls).
    invite: Option<ServerKey>,
    /// The latest INVITE received (initial or re-INVITE), which a 2xx ACK confirms.
    last_invite: Option<ServerKey>,
    /// re-INVITE/UPDATE server transactions waiting for the call's answer, by txn number.
    reoffers: HashMap<u64, ServerKey>,
    /// A hang-up asked for before the ACK arrived.
    bye_pending: bool,
    /// The body of the ACK being applied, handed on with [`DialogEvent::Confirmed`].
    ack_body: Bytes,
    /// The session timer (RFC 4028) of a call we answered, when it asked for one, and when
    /// the UA core next acts on it (our refresh, or the BYE for want of the caller's).
    session: Option<SessionTimer>,
    session_due: Option<Instant>,
    /// The SDP of our last 2xx, sent again unchanged by a re-INVITE refresh.
    local_sdp: Bytes,
    /// An inbound call counted against its source's call limits: the source's address.
    counted: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerRef {
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
}

/// The UA core task's state.
pub struct UaCore {
    transport: TransportHandle,
    local: SocketAddr,
    user_agent: String,
    app: mpsc::Sender<AppEvent>,
    cmd_tx: mpsc::Sender<Command>,
    cmd_rx: mpsc::Receiver<Command>,
    server: HashMap<ServerKey, (u64, Box<ServerEntry>)>,
    server_ids: HashMap<u64, ServerKey>,
    client: HashMap<ClientKey, (u64, ClientEntry)>,
    client_ids: HashMap<u64, ClientKey>,
    dialogs: HashMap<DialogId, DialogEntry>,
    /// Outbound calls not answered (nor failed) yet.
    outbound: HashMap<DialogId, OutboundLeg>,
    by_local_tag: HashMap<(String, String), DialogId>,
    timers: BinaryHeap<Reverse<(Instant, TimerRef)>>,
    next_id: u64,
    stats: Arc<UaStats>,
    /// Agents' log-in; None when no agents are configured (REGISTER is then refused).
    registrar: Option<Registrar>,
    /// What an outbound INVITE to a trunk answers a 401/407 with ([`UaCore::with_trunk_auth`]).
    trunk_auth: TrunkCredentials,
    /// How log lines show numbers ([`UaCore::with_log`]).
    log: crate::logging::LogConfig,
    /// The registrar expiry the timer heap holds (earliest scheduled).
    registrar_timer: Option<Instant>,
    /// Where [`AgentEvent`]s go, once someone asked ([`UaCore::agent_events`]).
    agent_tx: Option<mpsc::Sender<AgentEvent>>,
    /// Agent id → preferred contact URI and flow, kept by this task.
    agent_contacts: Arc<DashMap<String, (String, Flow)>>,
    /// Source networks INVITEs are taken from (empty: any).
    trunks_allow: Vec<IpNet>,
    /// Per-source limit on out-of-dialog requests other than INVITE.
    limiter: RateLimiter,
    /// Per-source limits on new calls from sources not in `trunks_allow`.
    calls: CallLimiter,
    /// A sweep of `calls`' log windows is on the timer heap.
    calls_sweep_due: bool,
    /// Where dropped requests are counted.
    metrics: Option<Arc<Metrics>>,
    /// Our registration with the trunk ([`UaCore::with_trunk_registration`]).
    trunk: Option<TrunkClient>,
    /// Cancelled when the server starts draining: the trunk registration is then removed.
    draining: Option<CancellationToken>,
    /// Looks up the host names of outbound targets and of the trunk's registrar.
    resolver: Resolver,
    /// Owns the tasks this core starts (look-ups, connections, event deliveries).
    tasks: TaskTracker,
    /// Stops those tasks (the token [`UaCore::run`] was given).
    cancel: CancellationToken,
    /// Dialogs whose listener fell too far behind, to be ended ([`UaCore::end_backlogged`]).
    backlogged: Vec<DialogId>,
}

/// What [`UaCore::with_screening`] drops or refuses. The default screens nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Screening {
    /// Source networks INVITEs are taken from; empty takes them from anywhere. Sources listed
    /// here are trusted trunks: the per-source call limits below do not apply to them.
    pub trunks_allow: Vec<IpNet>,
    /// Out-of-dialog requests other than INVITE/CANCEL per second per source; 0: no limit.
    pub per_second: u32,
    /// Burst allowed per source before `per_second` applies.
    pub burst: u32,
    /// Calls at once per untrusted source (`limits.max_calls_per_source`); 0: no limit.
    pub max_calls_per_source: usize,
    /// New INVITEs per second per untrusted source (`limits.invites_per_second`); 0: no limit.
    pub invites_per_second: u32,
    /// INVITEs one untrusted source may send at once (`limits.invites_burst`).
    pub invites_burst: u32,
}

/// How long after a source's first refused INVITE is logged its further ones are only counted.
const CALL_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// What [`UaCore::screen`] does with a new request.
enum Screened {
    /// Handle it.
    Pass,
    /// A new call from an untrusted source that now counts against its source's limits.
    Admitted,
    /// Drop it unanswered, for this reason (a `/metrics` label).
    Drop(&'static str),
    /// A new call over its source's limits (see [`CallVerdict::Refuse`]).
    Refuse {
        limit: guard::CallLimit,
        retry_after: u32,
        answer: bool,
        log: LogVerdict,
    },
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
            outbound: HashMap::new(),
            by_local_tag: HashMap::new(),
            timers: BinaryHeap::new(),
            next_id: 1,
            stats: Arc::new(UaStats::default()),
            registrar: None,
            trunk_auth: TrunkCredentials::default(),
            log: crate::logging::LogConfig::default(),
            registrar_timer: None,
            agent_tx: None,
            agent_contacts: Arc::new(DashMap::new()),
            trunks_allow: Vec::new(),
            limiter: RateLimiter::new(0, 0, 1),
            calls: CallLimiter::new(0, 0, 0, CALL_LOG_WINDOW),
            calls_sweep_due: false,
            metrics: None,
            trunk: None,
            draining: None,
            resolver: Resolver::system(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            backlogged: Vec::new(),
        }
    }

    /// Look host names up with `resolver` (shared, so its cache is). Default: one of the
    /// system's configuration ([`Resolver::system`]).
    pub fn with_resolver(mut self, resolver: Resolver) -> Self {
        self.resolver = resolver;
        self
    }

    /// Start this core's own tasks (host name look-ups, TCP connections to trunks, deliveries
    /// of queued events) on `tracker`, so that shutdown waits for them. Without it they run
    /// on a tracker of the core's own.
    pub fn with_tasks(mut self, tracker: TaskTracker) -> Self {
        self.tasks = tracker;
        self
    }

    /// Drop what `screening` says (see the module docs), counting each drop in `metrics`.
    pub fn with_screening(mut self, screening: Screening, metrics: Arc<Metrics>) -> Self {
        self.trunks_allow = screening.trunks_allow;
        self.limiter = RateLimiter::new(screening.per_second, screening.burst, guard::MAX_SOURCES);
        self.calls = CallLimiter::new(
            screening.max_calls_per_source,
            screening.invites_per_second,
            screening.invites_burst,
            CALL_LOG_WINDOW,
        );
        self.metrics = Some(metrics);
        self
    }

    /// Let agents log in through this registrar: REGISTER is answered by it (and listed in
    /// `Allow`). Without one, REGISTER gets 403.
    pub fn with_registrar(mut self, registrar: Registrar) -> Self {
        self.registrar = Some(registrar);
        self
    }

    /// Answer a `401`/`407` to an outbound INVITE sent to a target URI (a trunk: the 911 side,
    /// call-backs; not an operator's phone reached over its registration) once, with these
    /// credentials (RFC 3261 §22.2, digest as RFC 7616). Without them, or if the answer is
    /// challenged again, the leg fails with that code.
    pub fn with_trunk_auth(mut self, creds: TrunkCredentials) -> Self {
        self.trunk_auth = creds;
        self
    }

    /// Show the user part of outbound targets (a call-back dials the caller's number) as
    /// `log` says; call before [`UaCore::outbound`].
    pub fn with_log(mut self, log: crate::logging::LogConfig) -> Self {
        self.log = log;
        self
    }

    /// Register with the trunk as `cfg` says (see [`crate::sip::trunk`]), answering its
    /// challenges with the [`UaCore::with_trunk_auth`] credentials (so call that first), and
    /// remove the binding once `draining` is cancelled. An unusable `cfg` is refused.
    pub fn with_trunk_registration(
        mut self,
        cfg: Option<RegisterConfig>,
        draining: CancellationToken,
    ) -> Result<Self, String> {
        let Some(cfg) = cfg else { return Ok(self) };
        cfg.check()?;
        // A host name is looked up before each REGISTER ([`TrunkClient`]); until then a
        // documentation address of our family stands in, for the checks.
        let by_name = crate::sip::resolve::needs_lookup(&cfg.registrar);
        let stand_in = if self.local.is_ipv4() {
            SocketAddr::from(([192, 0, 2, 1], 5060))
        } else {
            SocketAddr::from((
                std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
                5060,
            ))
        };
        if by_name {
            let host = crate::sip::message::uri_host_port(&cfg.registrar).map(|(h, _)| h);
            if !host.is_some_and(crate::sip::resolve::valid_hostname) {
                return Err(format!(
                    "trunks.register.registrar {:?}: the host is not an IP address or a name",
                    cfg.registrar
                ));
            }
        }
        let remote = outbound_target(
            &cfg.registrar,
            self.local,
            by_name.then_some(stand_in),
            true,
        )
        .map_err(|e| format!("trunks.register.registrar {:?}: {e}", cfg.registrar))?;
        let client = TrunkClient::new(cfg, self.trunk_auth.clone(), remote, Self::now());
        self.timers
            .push(Reverse((Self::now(), TimerRef::TrunkRegister)));
        self.trunk = Some(client);
        self.draining = Some(draining);
        self.publish_trunk_status(Self::now());
        Ok(self)
    }

    /// [`UaCore::with_registrar`] for these `(agent id, password or its hashes)` pairs, with digest realm
    /// `realm` and a random nonce secret; no agents, no registrar.
    pub fn with_agents<S: Into<AgentSecret>>(
        self,
        realm: &str,
        agents: impl IntoIterator<Item = (String, S)>,
        digest_algorithms: &[String],
    ) -> Self {
        let agents: Vec<(String, AgentSecret)> =
            agents.into_iter().map(|(id, s)| (id, s.into())).collect();
        if agents.is_empty() {
            return self;
        }
        info!(
            agents = agents.len(),
            realm, "agents can log in by REGISTER"
        );
        let secret: [u8; 32] = rand::random();
        self.with_registrar(
            Registrar::new(realm.to_owned(), &agents, secret).with_algorithms(digest_algorithms),
        )
    }

    /// Agents logging in and out, in order; take it before [`UaCore::run`]. Only the receiver
    /// of the latest call hears events. Events are dropped (with a warning) when the receiver
    /// lags 1024 behind; [`UaCore::agent_contacts`] is always current.
    pub fn agent_events(&mut self) -> mpsc::Receiver<AgentEvent> {
        let (tx, rx) = mpsc::channel(1024);
        self.agent_tx = Some(tx);
        rx
    }

    /// Agent id → (preferred contact URI, flow it registered over), for every agent logged in;
    /// kept current by the UA task. Read it to place an INVITE to an agent with
    /// [`OutboundHandle::invite_via`].
    pub fn agent_contacts(&self) -> Arc<DashMap<String, (String, Flow)>> {
        self.agent_contacts.clone()
    }

    /// The address to name in Via and Contact towards a peer at `remote`: the advertised one,
    /// or, when that is unspecified (bound to `0.0.0.0` or `[::]` with no `advertise_ip`), the
    /// local address that routes to the peer, so that IPv6 peers get an IPv6 Contact.
    fn local_for(&self, remote: SocketAddr) -> SocketAddr {
        local_for(self.local, remote)
    }

    fn allow(&self) -> &'static str {
        if self.registrar.is_some() {
            ALLOW_WITH_REGISTER
        } else {
            ALLOW
        }
    }

    pub fn stats(&self) -> Arc<UaStats> {
        self.stats.clone()
    }

    /// A handle for starting outbound calls; take it before [`UaCore::run`].
    pub fn outbound(&self) -> OutboundHandle {
        OutboundHandle {
            tx: self.cmd_tx.clone(),
            bound: self.transport.local_addr(),
            resolver: self.resolver.clone(),
            transport: self.transport.clone(),
            log: self.log,
        }
    }

    /// Run until cancelled or the transport closes.
    pub async fn run(mut self, mut inbound: mpsc::Receiver<Inbound>, cancel: CancellationToken) {
        self.cancel = cancel.clone();
        let draining = self.draining.take();
        let mut unbound = draining.is_none();
        let mut heartbeat = tokio::time::interval(UA_HEARTBEAT);
        loop {
            let deadline = self.timers.peek().map(|Reverse((at, _))| *at);
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let drain = async {
                match &draining {
                    Some(d) => d.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = drain, if !unbound => {
                    unbound = true;
                    self.unregister_trunk(Self::now()).await;
                }
                m = inbound.recv() => match m {
                    Some(m) => self.on_inbound(m).await,
                    None => return,
                },
                Some(c) = self.cmd_rx.recv() => self.on_command(c).await,
                _ = sleep => self.on_timers(Self::now()).await,
                _ = heartbeat.tick() => {}
            }
            self.stats.heartbeat.beat(Self::now());
            if let Some(d) = self.stats.heartbeat.take_stall() {
                tokio::time::sleep(d).await;
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
        self.end_backlogged(Self::now()).await;
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
        let counted = match self.screen(&req, &flow, now) {
            Screened::Pass => None,
            Screened::Admitted => Some(flow.remote.ip()),
            Screened::Drop(reason) => {
                debug!(remote = %flow.remote, method = %req.method, reason, "request dropped unanswered");
                if let Some(m) = &self.metrics {
                    m.add(
                        "ivr311_sip_requests_dropped_total",
                        "SIP requests dropped without an answer (scanner, source not allowed, rate limited).",
                        &[("reason", reason)],
                        1,
                    );
                }
                return;
            }
            Screened::Refuse {
                limit,
                retry_after,
                answer,
                log,
            } => {
                self.refuse_call(&req, &flow, limit, retry_after, answer, log, now)
                    .await;
                return;
            }
        };
        if let Some((code, resp)) = self.refuse_extension_or_body(&req) {
            if let Some(ip) = counted {
                self.calls.ended(ip);
            }
            self.new_server_and_respond(key, req, flow, None, code, resp, now)
                .await;
            return;
        }
        if req.method == Method::Register {
            self.on_register(req, key, flow, now).await;
            return;
        }
        if req.to.tag().is_some() {
            self.on_in_dialog(req, key, flow, now).await;
            return;
        }
        match req.method {
            Method::Invite => self.on_invite(req, key, flow, counted, now).await,
            Method::Options => {
                let resp = self
                    .response(&req, 200, "OK", None)
                    .header("Allow", self.allow())
                    .header("Accept", "application/sdp")
                    .header("Supported", "timer")
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
                    .header("Allow", self.allow())
                    .build();
                self.new_server_and_respond(key, req, flow, None, 501, resp, now)
                    .await;
            }
            _ => {
                let resp = self
                    .response(&req, 405, "Method Not Allowed", None)
                    .header("Allow", self.allow())
                    .build();
                self.new_server_and_respond(key, req, flow, None, 405, resp, now)
                    .await;
            }
        }
    }

    /// What to do with a new request (not ACK, CANCEL or a retransmission): requests inside
    /// a dialog we hold always pass; an INVITE outside one from a source that is not a trusted
    /// trunk counts against its source's call limits (or is refused by them).
    fn screen(&mut self, req: &Request, flow: &Flow, now: Instant) -> Screened {
        if let Some(tag) = req.to.tag() {
            if self
                .by_local_tag
                .contains_key(&(req.call_id.clone(), tag.to_owned()))
            {
                return Screened::Pass;
            }
        }
        if req.header("User-Agent").is_some_and(guard::is_scanner) {
            return Screened::Drop("scanner");
        }
        let ip = flow.remote.ip();
        if req.method == Method::Invite {
            if !guard::allowed(&self.trunks_allow, ip) {
                return Screened::Drop("source_not_allowed");
            }
            if req.to.tag().is_some() {
                // A re-INVITE for a dialog we do not hold: answered 481, no call to count.
                return Screened::Pass;
            }
            if self.trunks_allow.iter().any(|n| n.contains(ip)) {
                return Screened::Pass;
            }
            return match self.calls.admit(ip, now) {
                CallVerdict::Admit => Screened::Admitted,
                CallVerdict::Refuse {
                    limit,
                    retry_after,
                    answer,
                    log,
                } => Screened::Refuse {
                    limit,
                    retry_after,
                    answer,
                    log,
                },
            };
        }
        if self.limiter.allow(ip, now) {
            Screened::Pass
        } else {
            Screened::Drop("rate_limited")
        }
    }

    /// Refuse a new call over its source's limits: a stateless 503 with Retry-After (when the
    /// source is within its bucket of answered refusals), counted, and logged once per source
    /// and window.
    #[allow(clippy::too_many_arguments)]
    async fn refuse_call(
        &mut self,
        req: &Request,
        flow: &Flow,
        limit: guard::CallLimit,
        retry_after: u32,
        answer: bool,
        log: LogVerdict,
        now: Instant,
    ) {
        if let Some(m) = &self.metrics {
            m.add(
                "ivr311_sip_invites_limited_total",
                "New INVITEs refused by a per-source limit (calls at once, INVITE rate).",
                &[("limit", limit.label())],
                1,
            );
            if !answer {
                m.add(
                    "ivr311_sip_invites_limited_unanswered_total",
                    "INVITEs refused by a per-source limit and not answered: their source was past its answered refusals.",
                    &[],
                    1,
                );
            }
        }
        if let LogVerdict::LogAfter(sup) = &log {
            log_calls_suppressed(sup);
        }
        if log != LogVerdict::Quiet {
            warn!(
                remote = %flow.remote,
                limit = limit.label(),
                active = self.calls.active(flow.remote.ip()),
                answered = answer,
                "new call refused: its source is over a per-source limit (503)"
            );
            if !self.calls_sweep_due {
                self.calls_sweep_due = true;
                self.timers
                    .push(Reverse((now + CALL_LOG_WINDOW, TimerRef::CallLogSweep)));
            }
        }
        if answer {
            let resp = self
                .response(req, 503, "Service Unavailable", None)
                .header("Retry-After", retry_after.to_string())
                .build();
            self.transport.send(flow, resp).await;
        }
    }

    /// Log the summaries of the call limiter's log windows that are over; sweep again later
    /// while any is open.
    fn sweep_call_logs(&mut self, now: Instant) {
        self.calls_sweep_due = false;
        for sup in self.calls.sweep(now) {
            log_calls_suppressed(&sup);
        }
        if self.calls.has_log_windows() {
            self.calls_sweep_due = true;
            self.timers
                .push(Reverse((now + CALL_LOG_WINDOW, TimerRef::CallLogSweep)));
        }
    }

    /// Refusals that come before method handling (RFC 3261 §8.2.2-8.2.3, RFC 4475 §3.3.5,
    /// §3.3.6, §3.3.15): a `Require`d extension we do not support (420, listing it in
    /// `Unsupported`), an INVITE body that is not SDP (415), and an INVITE whose `Accept`
    /// excludes SDP, so that no answer we could send is acceptable (406).
    ///
    /// An INVITE or UPDATE may require `timer` (RFC 4028, see [`crate::sip::session_timer`]);
    /// one asking for a session interval under our Min-SE gets 422 with `Min-SE: 90`.
    ///
    /// The other extension an INVITE may require is `100rel` (RFC 3262): it asks that
    /// provisional responses other than 100 be sent reliably, and we honour it by sending none
    /// on that call (no 180 while `answer_after_ms` rings; see [`UaCore::respond_invite`]), so
    /// there is nothing to PRACK. Some carrier and IMS trunks require it on every INVITE, and a
    /// 420 refused all their callers.
    fn refuse_extension_or_body(&self, req: &Request) -> Option<(u16, Bytes)> {
        let required: Vec<&str> = req
            .headers_named("Require")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .filter(|t| !(req.method == Method::Invite && t.eq_ignore_ascii_case("100rel")))
            .filter(|t| {
                !(matches!(req.method, Method::Invite | Method::Update)
                    && t.eq_ignore_ascii_case("timer"))
            })
            .collect();
        if !required.is_empty() {
            let resp = self
                .response(req, 420, "Bad Extension", None)
                .header("Unsupported", required.join(", "))
                .build();
            return Some((420, resp));
        }
        if matches!(req.method, Method::Invite | Method::Update)
            && session_timer::ask(req) == session_timer::Ask::TooSmall
        {
            let resp = self
                .response(req, 422, "Session Interval Too Small", None)
                .header("Min-SE", session_timer::MIN_SE)
                .build();
            return Some((422, resp));
        }
        if req.method != Method::Invite {
            return None;
        }
        let is_sdp = |t: &str| {
            let t = t.split(';').next().unwrap_or("").trim();
            t.eq_ignore_ascii_case("application/sdp")
        };
        if !req.body.is_empty() {
            if let Some(ct) = req.content_type().filter(|ct| !is_sdp(ct)) {
                let resp = self
                    .response(req, 415, "Unsupported Media Type", None)
                    .header("Accept", "application/sdp")
                    .header(
                        "Warning",
                        format!(
                            "399 ivr311 \"unsupported body {}\"",
                            crate::sip::message::sanitize_quoted(ct)
                        ),
                    )
                    .build();
                return Some((415, resp));
            }
        }
        let accepts: Vec<&str> = req
            .headers_named("Accept")
            .flat_map(|v| v.split(','))
            .map(|t| t.split(';').next().unwrap_or("").trim())
            .filter(|t| !t.is_empty())
            .collect();
        let sdp_ok = accepts
            .iter()
            .any(|t| is_sdp(t) || *t == "*/*" || t.eq_ignore_ascii_case("application/*"));
        // An Accept header that is present but empty means "no body", which we can honour
        // only by answering without SDP; treat it like one that excludes SDP.
        if req.headers_named("Accept").next().is_some() && !sdp_ok {
            let resp = self
                .response(req, 406, "Not Acceptable", None)
                .header("Accept", "application/sdp")
                .header(
                    "Warning",
                    "399 ivr311 \"our answers carry application/sdp\"",
                )
                .build();
            return Some((406, resp));
        }
        None
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

    /// REGISTER (never part of a dialog): the registrar answers, through a server transaction
    /// so that retransmissions get the same answer and are not counted twice.
    async fn on_register(&mut self, req: Request, key: ServerKey, flow: Flow, now: Instant) {
        let Some(registrar) = self.registrar.as_mut() else {
            let resp = self
                .response(&req, 403, "Forbidden", None)
                .header("Warning", "399 ivr311 \"no agents configured\"")
                .build();
            self.new_server_and_respond(key, req, flow, None, 403, resp, now)
                .await;
            return;
        };
        let (reply, events) = registrar.handle(now, &req, flow);
        let locks = registrar.locks(now);
        *self.stats.locks.lock().unwrap_or_else(|e| e.into_inner()) = locks;
        let mut b = self.response(&req, reply.code, reply.reason, None);
        for (name, value) in &reply.headers {
            b = b.header(name, value);
        }
        let resp = b.build();
        self.new_server_and_respond(key, req, flow, None, reply.code, resp, now)
            .await;
        self.on_agent_events(events);
        self.schedule_registrar();
    }

    /// Keep [`UaCore::agent_contacts`] current and pass the events on. The flow an agent's
    /// phone is reached over is held open while it is logged in: a phone registered over TCP
    /// may send nothing but keep-alives between registrations, and the connection is the only
    /// way to reach it.
    fn on_agent_events(&mut self, events: Vec<AgentEvent>) {
        for ev in events {
            match &ev {
                AgentEvent::LoggedIn {
                    agent,
                    contact,
                    flow,
                } => {
                    self.transport.hold(flow);
                    if let Some((_, (_, old))) = self.agent_contacts.remove(agent) {
                        self.transport.release(&old);
                    }
                    self.agent_contacts
                        .insert(agent.clone(), (contact.clone(), *flow));
                }
                AgentEvent::LoggedOut { agent } => {
                    if let Some((_, (_, old))) = self.agent_contacts.remove(agent) {
                        self.transport.release(&old);
                    }
                }
            }
            let Some(tx) = &self.agent_tx else {
                continue;
            };
            match tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    warn!(?ev, "agent event listener backlogged; event dropped")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => self.agent_tx = None,
            }
        }
    }

    /// Make sure the timer heap wakes us for the registrar's next expiry.
    fn schedule_registrar(&mut self) {
        let Some(next) = self.registrar.as_ref().and_then(Registrar::next_expiry) else {
            return;
        };
        if self.registrar_timer.is_some_and(|t| t <= next) {
            return;
        }
        self.registrar_timer = Some(next);
        self.timers.push(Reverse((next, TimerRef::Registrar)));
    }

    fn on_registrar_timer(&mut self, now: Instant) {
        if self.registrar_timer.is_some_and(|t| t <= now) {
            self.registrar_timer = None;
        }
        let events = match self.registrar.as_mut() {
            Some(r) => r.expire(now),
            None => return,
        };
        self.on_agent_events(events);
        self.schedule_registrar();
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

    fn server_entry(&mut self, id: u64) -> Option<&mut ServerEntry> {
        let key = self.server_ids.get(&id)?;
        self.server.get_mut(key).map(|(_, e)| &mut **e)
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
        let Some(de) = self.dialogs.get_mut(&d) else {
            return;
        };
        let Some(invite) = de.last_invite.clone() else {
            return;
        };
        // Its answer, if our 2xx made the offer; a retransmitted ACK finds the transaction
        // acked already and is absorbed.
        de.ack_body = req.body.clone();
        if let Some((id, e)) = self.server.get_mut(&invite) {
            let id = *id;
            let out = e.tx.on_ack(now);
            self.apply_server(id, out, now).await;
        }
        if let Some(de) = self.dialogs.get_mut(&d) {
            de.ack_body = Bytes::new();
        }
    }

    async fn on_dialog_acked(&mut self, d: DialogId, now: Instant) {
        let (bye_pending, sdp) = match self.dialogs.get_mut(&d) {
            Some(de) => {
                de.dialog.state = DialogState::Confirmed { acked: true };
                (de.bye_pending, std::mem::take(&mut de.ack_body))
            }
            None => return,
        };
        self.dialog_event(d, DialogEvent::Confirmed { sdp });
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
            Some(ServerEntry {
                tx,
                request: Some(request),
                ..
            }) => {
                let r =
                    ResponseBuilder::new(request, 487, "Request Terminated", local_tag.as_deref())
                        .build();
                tx.respond(now, 487, r)
            }
            _ => return,
        };
        self.apply_server(invite_id, resp, now).await;
        if let Some(d) = dialog {
            info!("caller cancelled before answer");
            self.dialog_event(d, DialogEvent::Cancelled);
            self.remove_dialog(d);
        }
    }

    /// A new call. `counted`: the source address it counts against in the per-source call
    /// limits, until its dialog is gone.
    async fn on_invite(
        &mut self,
        req: Request,
        key: ServerKey,
        flow: Flow,
        counted: Option<std::net::IpAddr>,
        now: Instant,
    ) {
        let d = self.next_id();
        let session = match session_timer::ask(&req) {
            session_timer::Ask::Timer(t) => Some(t),
            _ => None,
        };
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
            local: self.local_for(flow.remote),
            content_type: req.content_type().map(str::to_owned),
            body: req.body.clone(),
            headers: req.headers.clone(),
        };
        let trying = ResponseBuilder::new(&req, 100, "Trying", None).build();
        let id = self.insert_server(key.clone(), req, flow, Some(d));
        self.by_local_tag
            .insert((dialog.call_id.clone(), local_tag), d);
        self.insert_dialog(
            d,
            DialogEntry {
                dialog,
                events: EventSink::Call(EventQueue::new(ev_tx)),
                invite: Some(key.clone()),
                last_invite: Some(key),
                reoffers: HashMap::new(),
                bye_pending: false,
                ack_body: Bytes::new(),
                session,
                session_due: None,
                local_sdp: Bytes::new(),
                counted,
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
                debug!(call_id = %req.call_id, "far end hung up");
                let resp = self.response(&req, 200, "OK", Some(&local_tag)).build();
                self.new_server_and_respond(key, req, flow, None, 200, resp, now)
                    .await;
                self.dialog_event(d, DialogEvent::Bye);
                self.remove_dialog(d);
            }
            Method::Invite | Method::Update => {
                let busy = self.dialogs.get(&d).is_some_and(|de| {
                    !de.reoffers.is_empty()
                        || de
                            .invite
                            .as_ref()
                            .and_then(|k| self.server.get(k))
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
                        de.last_invite = Some(key.clone());
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
                    .header("Allow", self.allow())
                    .build();
                self.new_server_and_respond(key, req, flow, None, 501, resp, now)
                    .await;
            }
            _ => {
                let resp = self
                    .response(&req, 405, "Method Not Allowed", Some(&local_tag))
                    .header("Allow", self.allow())
                    .build();
                self.new_server_and_respond(key, req, flow, None, 405, resp, now)
                    .await;
            }
        }
    }

    /// Hand `ev` to dialog `d`'s listener, now or, when it is behind, in order later (see the
    /// module docs); never dropped while the listener is there.
    fn dialog_event(&mut self, d: DialogId, ev: DialogEvent) {
        let Some(de) = self.dialogs.get_mut(&d) else {
            return;
        };
        match de.events.push(ev) {
            Queued::Taken => {}
            Queued::NeedsWaiter => match &de.events {
                EventSink::Call(q) => {
                    let tx = q.tx.clone();
                    self.wait_for_room(d, tx);
                }
                EventSink::Leg(q) => {
                    let tx = q.tx.clone();
                    self.wait_for_room(d, tx);
                }
                EventSink::Detached => {}
            },
            Queued::Overflow => self.backlogged.push(d),
            Queued::Gone => debug!("call not listening; dialog event dropped"),
        }
    }

    /// Have a task wait until `tx` (dialog `d`'s listener) has room, then tell this core
    /// ([`Command::Room`]).
    fn wait_for_room<T: Send + 'static>(&self, d: DialogId, tx: mpsc::Sender<T>) {
        let (cmd, cancel) = (self.cmd_tx.clone(), self.cancel.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                room = tx.reserve() => {
                    drop(room);
                    let _ = cmd.send(Command::Room { dialog: d }).await;
                }
            }
        });
    }

    /// Dialog `d`'s listener has room: deliver what waits for it.
    fn on_room(&mut self, d: DialogId) {
        if let Some(de) = self.dialogs.get_mut(&d) {
            match &mut de.events {
                EventSink::Call(q) => {
                    if q.flush() {
                        let tx = q.tx.clone();
                        self.wait_for_room(d, tx);
                    }
                }
                EventSink::Leg(q) => {
                    if q.flush() {
                        let tx = q.tx.clone();
                        self.wait_for_room(d, tx);
                    }
                }
                EventSink::Detached => {}
            }
        } else if let Some(leg) = self.outbound.get_mut(&d) {
            if leg.events.flush() {
                let tx = leg.events.tx.clone();
                self.wait_for_room(d, tx);
            }
        }
    }

    /// A listener whose dialog is over: a task hands it what is still queued, in order (for
    /// up to [`DRAIN_WITHIN`]), then the channel closes.
    fn drain_later<T: Send + 'static>(&self, q: EventQueue<T>) {
        let EventQueue { tx, backlog, .. } = q;
        if backlog.is_empty() {
            return;
        }
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let deliver = async {
                for ev in backlog {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                done = tokio::time::timeout(DRAIN_WITHIN, deliver) => {
                    if done.is_err() {
                        warn!("a call did not take its last SIP events in time; dropped");
                    }
                }
            }
        });
    }

    /// Outbound leg `leg` is over with `last` (its failure): its owner hears it after what is
    /// queued.
    fn finish_leg(&self, leg: OutboundLeg, last: LegEvent) {
        let mut q = leg.events;
        if !q.tx.is_closed() {
            if q.backlog.is_empty() {
                if let Err(mpsc::error::TrySendError::Full(ev)) = q.tx.try_send(last) {
                    q.backlog.push_back(ev);
                }
            } else {
                q.backlog.push_back(last);
            }
        }
        self.drain_later(q);
    }

    /// End the dialogs whose listener fell [`MAX_EVENT_BACKLOG`] events behind, as if the call
    /// had released them, and count them.
    async fn end_backlogged(&mut self, now: Instant) {
        for d in std::mem::take(&mut self.backlogged) {
            warn!(
                dialog = d,
                backlog = MAX_EVENT_BACKLOG,
                "a call is not taking its SIP events; ending it"
            );
            if let Some(m) = &self.metrics {
                m.add(
                    "ivr311_calls_ended_backlogged_total",
                    "Calls and outbound legs ended because they fell too far behind their SIP events.",
                    &[],
                    1,
                );
            }
            self.stats.ended_backlogged.fetch_add(1, Ordering::Relaxed);
            self.release_dialog(d, now).await;
        }
    }

    /// Add a dialog; a TCP connection it runs over stays open while it lasts.
    fn insert_dialog(&mut self, d: DialogId, entry: DialogEntry) {
        self.transport.hold(&entry.dialog.flow);
        if let Some(old) = self.dialogs.insert(d, entry) {
            self.transport.release(&old.dialog.flow);
            if let Some(ip) = old.counted {
                self.calls.ended(ip);
            }
        }
    }

    fn remove_dialog(&mut self, d: DialogId) {
        if let Some(de) = self.dialogs.remove(&d) {
            self.transport.release(&de.dialog.flow);
            if let Some(ip) = de.counted {
                self.calls.ended(ip);
            }
            match de.events {
                EventSink::Call(q) => self.drain_later(q),
                EventSink::Leg(q) => self.drain_later(q),
                EventSink::Detached => {}
            }
            let k = (de.dialog.call_id.clone(), de.dialog.local_tag.clone());
            // Another fork's dialog shares the Call-ID and our tag; only drop our own entry.
            if self.by_local_tag.get(&k) == Some(&d) {
                self.by_local_tag.remove(&k);
            }
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
        let allow = self.allow();
        let Some(de) = self.dialogs.get(&d) else {
            return;
        };
        // Outbound dialogs have no INVITE of ours to answer.
        let Some(key) = de.invite.clone() else {
            return;
        };
        let local_tag = de.dialog.local_tag.clone();
        let flow = de.dialog.flow;
        let session = de.session.filter(|_| (200..300).contains(&code));
        let local = self.local_for(flow.remote);
        let Some((id, e)) = self.server.get_mut(&key) else {
            return;
        };
        let id = *id;
        // No request left: a final response went already, and another would be refused.
        let Some(request) = e.request.as_deref() else {
            return;
        };
        if (101..200).contains(&code) && requires_100rel(request) {
            // It would have to be sent reliably (PRACK); the caller hears ringback from its own
            // side until the 200 instead.
            debug!(
                code,
                "provisional response not sent: the INVITE requires 100rel"
            );
            return;
        }
        let mut b = ResponseBuilder::new(request, code, reason, Some(&local_tag))
            .header("Server", &self.user_agent);
        if (101..300).contains(&code) {
            b = b
                .header("Contact", format_args!("<{}>", contact_uri(local, flow)))
                .header("Allow", allow)
                .header("Supported", "timer");
        }
        for (k, v) in headers
            .into_iter()
            .chain(session.iter().flat_map(SessionTimer::response_headers))
        {
            b = b.header(&k, v);
        }
        let sdp = body.as_ref().map(|(_, b)| b.clone());
        if let Some((ct, body)) = body {
            b = b.body(&ct, body);
        }
        let out = e.tx.respond(now, code, b.build());
        if (200..300).contains(&code) {
            if let Some(de) = self.dialogs.get_mut(&d) {
                de.dialog.state = DialogState::Confirmed { acked: false };
                if let Some(sdp) = sdp {
                    de.local_sdp = sdp;
                }
            }
            self.arm_session_timer(d, now);
        } else if code >= 300 {
            self.remove_dialog(d);
        }
        self.apply_server(id, out, now).await;
    }

    // ---- commands -------------------------------------------------------------------------

    async fn on_command(&mut self, c: Command) {
        let now = Self::now();
        self.command(c, now).await;
        self.end_backlogged(now).await;
    }

    async fn command(&mut self, c: Command, now: Instant) {
        match c {
            Command::Room { dialog } => self.on_room(dialog),
            Command::Invite(inv) => self.start_outbound(*inv, now).await,
            Command::TrunkResolved(found) => self.on_trunk_resolved(found, now).await,
            Command::TrunkConnected(opened) => self.on_trunk_connected(opened, now).await,
            Command::Hangup { dialog } | Command::Drop { dialog }
                if self.outbound.contains_key(&dialog) =>
            {
                // An outbound call not answered yet: CANCEL it.
                self.cancel_leg(dialog, now).await
            }
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
                // A 2xx to a re-INVITE or UPDATE refreshes the session (RFC 4028 §9-10),
                // with the interval the refresh asks for, if it asks.
                let asked = self
                    .server
                    .get(&key)
                    .and_then(|(_, e)| e.request.as_deref())
                    .map(session_timer::ask);
                let refreshed = match asked {
                    Some(asked) if code < 300 => {
                        self.refresh_session(dialog, asked, body.as_ref(), now)
                    }
                    _ => None,
                };
                let local = flow.map_or(self.local, |f| self.local_for(f.remote));
                let ua = self.user_agent.clone();
                let allow = self.allow();
                let Some((id, e)) = self.server.get_mut(&key) else {
                    return;
                };
                let id = *id;
                let Some(request) = e.request.as_deref() else {
                    return;
                };
                let reason = if code < 300 {
                    "OK"
                } else {
                    "Not Acceptable Here"
                };
                let mut b = ResponseBuilder::new(request, code, reason, Some(&local_tag))
                    .header("Server", ua);
                if let (Some(flow), true) = (flow, code < 300) {
                    b = b
                        .header("Contact", format_args!("<{}>", contact_uri(local, flow)))
                        .header("Allow", allow);
                }
                for (k, v) in refreshed.iter().flat_map(SessionTimer::response_headers) {
                    b = b.header(&k, v);
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
            Command::Drop { dialog } => self.release_dialog(dialog, now).await,
        }
    }

    /// The call is done with dialog `d` (or cannot keep up with it): if it is still up, end
    /// it properly (BYE; 500 for an inbound call not answered; CANCEL for an outbound call
    /// not answered).
    async fn release_dialog(&mut self, d: DialogId, now: Instant) {
        if self.outbound.contains_key(&d) {
            self.cancel_leg(d, now).await;
            return;
        }
        let state = self.dialogs.get(&d).map(|de| de.dialog.state);
        match state {
            Some(DialogState::Confirmed { acked: true }) => self.send_bye(d, now).await,
            Some(DialogState::Early) => {
                self.respond_invite(d, 500, "Server Internal Error", vec![], None, now)
                    .await
            }
            Some(DialogState::Confirmed { acked: false }) => {
                if let Some(de) = self.dialogs.get_mut(&d) {
                    de.bye_pending = true;
                }
            }
            _ => {}
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
        let invite = (method == Method::Invite).then(|| SentInvite {
            uri: de.dialog.remote_target.clone(),
            branch: branch.clone(),
            transport: flow.transport,
            local,
            from: format!("<{}>;tag={}", de.dialog.local_uri, de.dialog.local_tag),
            to: de.dialog.remote_from.clone(),
            call_id: de.dialog.call_id.clone(),
            cseq: de.dialog.local_cseq,
            routes: de.dialog.route_set.clone(),
            local_uri: de.dialog.local_uri.clone(),
            local_tag: de.dialog.local_tag.clone(),
        });
        let (tx, out) = ClientTransaction::new(
            now,
            method == Method::Invite,
            flow.transport.is_reliable(),
            bytes,
        );
        self.start_client(
            (branch, method.clone()),
            ClientEntry {
                tx,
                flow,
                dialog: Some(d),
                req,
                method,
                kind: ClientKind::InDialog,
                invite,
                acks: HashMap::new(),
            },
            out,
        )
        .await;
    }

    /// Register a new client transaction and carry out its first outputs (the request itself).
    /// Kept apart from [`UaCore::apply_client`] so that sending a request never recurses.
    async fn start_client(&mut self, key: ClientKey, entry: ClientEntry, out: Vec<Output>) {
        let id = self.next_id();
        let flow = entry.flow;
        let deadline = entry.tx.next_deadline();
        self.client_ids.insert(id, key.clone());
        self.client.insert(key, (id, entry));
        for o in out {
            if let Output::Transmit(b) = o {
                self.transport.send(&flow, b).await;
            }
        }
        if let Some(at) = deadline {
            self.timers.push(Reverse((at, TimerRef::Client(id))));
        }
    }

    // ---- session timers (RFC 4028) on calls we answered ----------------------------------------

    /// (Re)start dialog `d`'s session timer from `now`, if it has one.
    fn arm_session_timer(&mut self, d: DialogId, now: Instant) {
        let Some(de) = self.dialogs.get_mut(&d) else {
            return;
        };
        let Some(t) = de.session else { return };
        let at = now + t.next_action_after();
        de.session_due = Some(at);
        self.timers.push(Reverse((at, TimerRef::Session(d))));
    }

    /// A re-INVITE or UPDATE of dialog `d`, which `asked` for a session timer or not, is being
    /// answered 2xx with `body`: the session is refreshed. Returns the timer, for the 2xx's
    /// headers.
    fn refresh_session(
        &mut self,
        d: DialogId,
        asked: session_timer::Ask,
        body: Option<&(String, Bytes)>,
        now: Instant,
    ) -> Option<SessionTimer> {
        let de = self.dialogs.get_mut(&d)?;
        if let Some((_, sdp)) = body.filter(|(ct, _)| ct.starts_with("application/sdp")) {
            de.local_sdp = sdp.clone();
        }
        let old = de.session?;
        if let session_timer::Ask::Timer(mut t) = asked {
            t.use_update |= old.use_update;
            de.session = Some(t);
        }
        let t = de.session;
        self.arm_session_timer(d, now);
        t
    }

    /// Dialog `d`'s session timer is due: send our refresh, or end a call whose caller has
    /// stopped refreshing.
    async fn on_session_timer(&mut self, d: DialogId, now: Instant) {
        let Some(de) = self.dialogs.get(&d) else {
            return;
        };
        let (Some(t), Some(due)) = (de.session, de.session_due) else {
            return;
        };
        if due > now || de.dialog.state != (DialogState::Confirmed { acked: true }) {
            return; // a stale entry (refreshed since), or not up (yet, or any more)
        }
        if t.we_refresh {
            let (method, body) = if t.use_update {
                (Method::Update, None)
            } else {
                let sdp = de.local_sdp.clone();
                (Method::Invite, Some(("application/sdp".to_owned(), sdp)))
            };
            debug!(?method, interval = t.interval, "session refresh (RFC 4028)");
            self.arm_session_timer(d, now);
            self.send_request(d, SESSION_REFRESH, method, t.refresh_headers(), body, now)
                .await;
        } else {
            self.session_expired(d, now, "no session refresh from the caller")
                .await;
        }
    }

    /// The caller's answer to our session refresh: 408 or 481 mean the call is gone (§10);
    /// anything else (2xx, a 491 glare, a 501) leaves it up, refreshed or retried next time.
    async fn on_refresh_outcome(&mut self, d: DialogId, code: u16, now: Instant) {
        if matches!(code, 408 | 481) {
            self.session_expired(d, now, "the caller did not answer our session refresh")
                .await;
        }
    }

    /// End dialog `d` for its session timer: the call hears BYE as from the caller, and the
    /// caller gets our BYE (RFC 4028 §10).
    async fn session_expired(&mut self, d: DialogId, now: Instant, why: &str) {
        info!(why, "session timer: ending the call");
        self.dialog_event(d, DialogEvent::Bye);
        if let Some(de) = self.dialogs.get_mut(&d) {
            de.session = None;
        }
        self.send_bye(d, now).await;
    }

    // ---- registration with the trunk (UAC REGISTER) -------------------------------------------

    /// The trunk registration's timer: send the REGISTER that is due, if any.
    async fn poll_trunk_registration(&mut self, now: Instant) {
        let net = UaNet {
            transport: &self.transport,
            advertised: self.local,
        };
        let Some(needs) = self.trunk.as_mut().map(|t| t.poll(now, &net)) else {
            return;
        };
        self.carry_trunk(needs, now).await;
    }

    /// The registrar's name was looked up: send the REGISTER that waited for it, or count the
    /// failure (retried later, as any other).
    async fn on_trunk_resolved(&mut self, found: Result<Vec<SocketAddr>, String>, now: Instant) {
        let net = UaNet {
            transport: &self.transport,
            advertised: self.local,
        };
        let Some(needs) = self.trunk.as_mut().map(|t| t.on_resolved(now, found, &net)) else {
            return;
        };
        self.carry_trunk(needs, now).await;
    }

    /// The registrar's TCP connection was opened (or could not be).
    async fn on_trunk_connected(&mut self, opened: Result<Flow, String>, now: Instant) {
        let net = UaNet {
            transport: &self.transport,
            advertised: self.local,
        };
        let Some(needs) = self
            .trunk
            .as_mut()
            .map(|t| t.on_connected(now, opened, &net))
        else {
            return;
        };
        self.carry_trunk(needs, now).await;
    }

    /// The server is draining: remove our binding so the trunk sends new calls elsewhere.
    async fn unregister_trunk(&mut self, now: Instant) {
        let net = UaNet {
            transport: &self.transport,
            advertised: self.local,
        };
        let Some(needs) = self.trunk.as_mut().map(|t| t.unregister(&net)) else {
            return;
        };
        if !needs.is_empty() {
            info!("draining: removing our registration with the trunk");
        }
        self.carry_trunk(needs, now).await;
    }

    async fn on_trunk_register_final(&mut self, key: &ClientKey, resp: &Response, now: Instant) {
        let Some(needs) = self.trunk.as_mut().map(|t| t.on_final(now, &key.0, resp)) else {
            return;
        };
        self.carry_trunk(needs, now).await;
    }

    /// Do what the trunk registration needs: look-ups and connections off this task (their
    /// results come back as commands), REGISTERs in client transactions of their own.
    async fn carry_trunk(&mut self, needs: Vec<TrunkNeed>, now: Instant) {
        for need in needs {
            match need {
                TrunkNeed::Resolve(uri) => {
                    let (tx, bound) = (self.cmd_tx.clone(), self.transport.local_addr());
                    let resolver = self.resolver.clone();
                    self.tasks.spawn(async move {
                        let found = resolver.resolve_all(&uri, bound).await;
                        let _ = tx.send(Command::TrunkResolved(found)).await;
                    });
                }
                TrunkNeed::Connect(remote) => {
                    let (tx, transport) = (self.cmd_tx.clone(), self.transport.clone());
                    self.tasks.spawn(async move {
                        let opened = transport
                            .connect_tcp(remote)
                            .await
                            .map_err(|e| format!("TCP to {remote}: {e}"));
                        let _ = tx.send(Command::TrunkConnected(opened)).await;
                    });
                }
                TrunkNeed::Hold(flow) => self.transport.hold(&flow),
                TrunkNeed::Release(flow) => self.transport.release(&flow),
                TrunkNeed::Send(flow, out) => {
                    let key = (out.branch, Method::Register);
                    let (tx, first) =
                        ClientTransaction::new(now, false, flow.transport.is_reliable(), out.bytes);
                    self.start_client(
                        key,
                        ClientEntry {
                            tx,
                            flow,
                            dialog: None,
                            req: 0,
                            method: Method::Register,
                            kind: ClientKind::TrunkRegister,
                            invite: None,
                            acks: HashMap::new(),
                        },
                        first,
                    )
                    .await;
                }
            }
        }
        self.after_trunk_change(now);
    }

    /// Re-arm the registration's timer, publish its status, and log a change of state.
    fn after_trunk_change(&mut self, now: Instant) {
        if let Some(at) = self.trunk.as_ref().and_then(TrunkClient::due) {
            self.timers.push(Reverse((at, TimerRef::TrunkRegister)));
        }
        let before = self
            .stats
            .trunk_registration()
            .map(|s| (s.state, s.last_error));
        let now_status = self.publish_trunk_status(now);
        let Some(s) = now_status else { return };
        if before == Some((s.state.clone(), s.last_error.clone())) {
            return;
        }
        match s.state.as_str() {
            "registered" => {
                info!(aor = %s.aor, registrar = %s.registrar, expires_in = ?s.expires_in, "registered with the trunk")
            }
            "failed" => warn!(
                aor = %s.aor,
                registrar = %s.registrar,
                error = s.last_error.as_deref().unwrap_or_default(),
                retry_in = ?s.retry_in,
                "registration with the trunk failed; calls from it cannot reach us until it succeeds"
            ),
            _ => debug!(state = %s.state, "trunk registration"),
        }
    }

    fn publish_trunk_status(&self, now: Instant) -> Option<RegistrationStatus> {
        let status = self.trunk.as_ref().map(|r| r.status(now));
        *self.stats.trunk.lock().unwrap_or_else(|e| e.into_inner()) =
            status.clone().map(|s| (now, s));
        status
    }

    // ---- outbound calls (UAC) -----------------------------------------------------------------

    async fn start_outbound(&mut self, inv: InviteCommand, now: Instant) {
        let d = self.next_id();
        let InviteCommand {
            target,
            via,
            resolved,
            from_user,
            from_display,
            headers,
            sdp,
            events,
            reply,
        } = inv;
        let _ = reply.send(d);
        let target = target.trim().to_owned();
        let bound = self.transport.local_addr();
        let flow = match via {
            Some(flow) => via_flow(&target, flow, bound),
            None => outbound_target(&target, bound, resolved, false).map(|remote| Flow {
                transport: Transport::Udp,
                remote,
                conn: 0,
            }),
        };
        let flow = match flow {
            Ok(f) => f,
            Err(why) => {
                warn!(target = %self.log.uri(&target), why, "outbound call refused");
                let _ = events.try_send(LegEvent::Failed {
                    code: 503,
                    reason: why.to_owned(),
                });
                return;
            }
        };
        let local = self.local_for(flow.remote);
        let local_tag = random_token(12);
        let local_uri = format!("sip:{}@{local}", escape_user(&from_user));
        let from = match from_display
            .as_deref()
            .map(sanitize_quoted)
            .filter(|s| !s.trim().is_empty())
        {
            Some(name) => format!("\"{name}\" <{local_uri}>;tag={local_tag}"),
            None => format!("<{local_uri}>;tag={local_tag}"),
        };
        let sent = SentInvite {
            to: format!("<{target}>"),
            uri: target,
            branch: new_branch(),
            transport: flow.transport,
            local,
            from,
            call_id: random_token(24),
            cseq: 1,
            routes: Vec::new(),
            local_uri,
            local_tag,
        };
        let headers: Vec<(String, String)> = headers
            .into_iter()
            .filter_map(|(name, value)| {
                let h = extra_header(&name, &value);
                if h.is_none() {
                    warn!(header = %name, "extra header refused on outbound INVITE");
                }
                h
            })
            .collect();
        let bytes = self.invite_bytes(&sent, flow, &headers, &sdp, None);
        info!(call_id = %sent.call_id, target = %self.log.uri(&sent.uri), "outbound INVITE");
        let key = (sent.branch.clone(), Method::Invite);
        let auth = (via.is_none() && !self.trunk_auth.is_empty()).then(|| {
            Box::new(AuthRetry {
                creds: self.trunk_auth.clone(),
                flow,
                headers,
                sdp,
                answered: false,
            })
        });
        self.outbound.insert(
            d,
            OutboundLeg {
                events: EventQueue::new(events),
                invite: key.clone(),
                auth,
                state: LegState::Calling,
                cancel_deadline: None,
            },
        );
        self.start_invite_transaction(key, d, sent, flow, bytes, now)
            .await;
    }

    /// Start the INVITE client transaction `key` of outbound leg `d` (whose `invite` already
    /// names it).
    async fn start_invite_transaction(
        &mut self,
        key: ClientKey,
        d: DialogId,
        sent: SentInvite,
        flow: Flow,
        bytes: Bytes,
        now: Instant,
    ) {
        let (tx, out) = ClientTransaction::new(now, true, flow.transport.is_reliable(), bytes);
        self.start_client(
            key,
            ClientEntry {
                tx,
                flow,
                dialog: Some(d),
                req: 0,
                method: Method::Invite,
                kind: ClientKind::OutboundInvite,
                invite: Some(sent),
                acks: HashMap::new(),
            },
            out,
        )
        .await;
    }

    /// An outbound INVITE as `sent` describes it, with the extra `headers`, our `sdp`, and
    /// the answer to a digest challenge if there is one (`(header name, value)`).
    fn invite_bytes(
        &self,
        sent: &SentInvite,
        flow: Flow,
        headers: &[(String, String)],
        sdp: &Bytes,
        auth: Option<(&str, &str)>,
    ) -> Bytes {
        let mut b = RequestBuilder::new(
            &Method::Invite,
            &sent.uri,
            flow.transport.via_name(),
            sent.local,
            &sent.branch,
        )
        .header("From", &sent.from)
        .header("To", &sent.to)
        .header("Call-ID", &sent.call_id)
        .header("CSeq", format_args!("{} INVITE", sent.cseq))
        .header(
            "Contact",
            format_args!("<{}>", contact_uri(sent.local, flow)),
        )
        .header("Allow", self.allow())
        .header("User-Agent", &self.user_agent);
        if let Some((name, value)) = auth {
            b = b.header(name, value);
        }
        for (name, value) in headers {
            b = b.header(name, value);
        }
        b.body("application/sdp", sdp.clone()).build()
    }

    /// A 401/407 to an outbound INVITE (`key`): send it again once with the trunk's
    /// credentials, as a new transaction (same Call-ID and From tag, CSeq + 1, RFC 3261
    /// §22.2). Whether it was sent; if not, the leg fails with the code.
    async fn retry_with_auth(
        &mut self,
        key: &ClientKey,
        d: DialogId,
        resp: &Response,
        now: Instant,
    ) -> bool {
        let Some(leg) = self.outbound.get_mut(&d) else {
            return false;
        };
        if leg.state.cancelled() || leg.invite != *key {
            return false;
        }
        let Some(mut retry) = leg.auth.take() else {
            return false;
        };
        let Some(sent) = self.client.get(key).and_then(|(_, e)| e.invite.clone()) else {
            return false;
        };
        let (challenge, answer) = if resp.code == 407 {
            ("Proxy-Authenticate", "Proxy-Authorization")
        } else {
            ("WWW-Authenticate", "Authorization")
        };
        if retry.answered {
            let stale = resp.headers_named(challenge).any(|c| {
                c.to_ascii_lowercase()
                    .replace(' ', "")
                    .contains("stale=true")
            });
            if !stale {
                warn!(code = resp.code, "the trunk refused our credentials");
                return false;
            }
        }
        let cnonce = random_token(16);
        let Some(value) = retry.creds.answer(
            &resp.headers_named(challenge).collect::<Vec<_>>(),
            "INVITE",
            &sent.uri,
            &cnonce,
        ) else {
            warn!(code = resp.code, "no digest challenge we can answer");
            return false;
        };
        let sent = SentInvite {
            branch: new_branch(),
            cseq: sent.cseq + 1,
            ..sent
        };
        let bytes = self.invite_bytes(
            &sent,
            retry.flow,
            &retry.headers,
            &retry.sdp,
            Some((answer, &value)),
        );
        info!(call_id = %sent.call_id, code = resp.code, "outbound INVITE challenged; sent again with credentials");
        let new_key = (sent.branch.clone(), Method::Invite);
        let flow = retry.flow;
        let again = (!retry.answered).then(|| {
            retry.answered = true;
            retry
        });
        if let Some(leg) = self.outbound.get_mut(&d) {
            leg.invite = new_key.clone();
            leg.state = LegState::Calling;
            leg.auth = again;
        }
        self.start_invite_transaction(new_key, d, sent, flow, bytes, now)
            .await;
        true
    }

    /// Hang up an outbound leg that has not been answered: CANCEL once it is allowed (§9.1).
    async fn cancel_leg(&mut self, d: DialogId, now: Instant) {
        let Some(leg) = self.outbound.get_mut(&d) else {
            return;
        };
        match leg.state {
            LegState::Calling => {
                debug!("CANCEL held until a provisional response arrives");
                leg.state = LegState::CancelPending;
            }
            LegState::Proceeding => self.send_cancel(d, now).await,
            LegState::CancelPending | LegState::Cancelling => {}
        }
    }

    async fn send_cancel(&mut self, d: DialogId, now: Instant) {
        let Some(leg) = self.outbound.get_mut(&d) else {
            return;
        };
        if leg.state == LegState::Cancelling {
            return;
        }
        leg.state = LegState::Cancelling;
        let deadline = now + 64 * T1;
        leg.cancel_deadline = Some(deadline);
        let invite = leg.invite.clone();
        self.timers.push(Reverse((deadline, TimerRef::Leg(d))));
        let Some((_, e)) = self.client.get(&invite) else {
            return;
        };
        let Some(sent) = &e.invite else {
            return;
        };
        info!(call_id = %sent.call_id, "outbound call cancelled");
        let bytes = sent.build(&Method::Cancel, &sent.to);
        let key = (sent.branch.clone(), Method::Cancel);
        let flow = e.flow;
        let (tx, out) = ClientTransaction::new(now, false, flow.transport.is_reliable(), bytes);
        self.start_client(
            key,
            ClientEntry {
                tx,
                flow,
                dialog: Some(d),
                req: 0,
                method: Method::Cancel,
                kind: ClientKind::Cancel,
                invite: None,
                acks: HashMap::new(),
            },
            out,
        )
        .await;
    }

    /// Hand `ev` to outbound leg `d`'s owner (not answered yet), now or in order later.
    fn leg_event(&mut self, d: DialogId, ev: LegEvent) {
        let Some(leg) = self.outbound.get_mut(&d) else {
            return;
        };
        match leg.events.push(ev) {
            Queued::Taken => {}
            Queued::NeedsWaiter => {
                let tx = leg.events.tx.clone();
                self.wait_for_room(d, tx);
            }
            Queued::Overflow => self.backlogged.push(d),
            Queued::Gone => debug!("outbound call not listening; event dropped"),
        }
    }

    /// A response to an outbound INVITE, as its transaction passed it up.
    async fn on_outbound_response(
        &mut self,
        key: &ClientKey,
        d: DialogId,
        resp: &Response,
        now: Instant,
    ) {
        match resp.code {
            100..=199 => {
                if resp.code > 100 {
                    let sdp = (!resp.body.is_empty()
                        && resp.header("Content-Type").is_some_and(|t| {
                            t.trim().to_ascii_lowercase().starts_with("application/sdp")
                        }))
                    .then(|| resp.body.clone());
                    self.leg_event(
                        d,
                        LegEvent::Provisional {
                            code: resp.code,
                            sdp,
                        },
                    );
                }
                let Some(leg) = self.outbound.get_mut(&d) else {
                    return;
                };
                match leg.state {
                    LegState::Calling if leg.events.tx.is_closed() => {
                        // Nobody wants this call any more.
                        self.send_cancel(d, now).await
                    }
                    LegState::Calling => leg.state = LegState::Proceeding,
                    LegState::CancelPending => self.send_cancel(d, now).await,
                    LegState::Proceeding | LegState::Cancelling => {}
                }
            }
            200..=299 => self.on_outbound_2xx(key, d, resp, now).await,
            401 | 407 if self.retry_with_auth(key, d, resp, now).await => {}
            _ => {
                let Some(leg) = self.outbound.remove(&d) else {
                    return;
                };
                info!(code = resp.code, reason = %resp.reason, "outbound call failed");
                self.finish_leg(
                    leg,
                    LegEvent::Failed {
                        code: resp.code,
                        reason: resp.reason.clone(),
                    },
                );
            }
        }
    }

    /// A 2xx to an outbound INVITE: ACK it, and either hand the dialog to the leg (the first
    /// 2xx of a call still wanted) or BYE it (the call was cancelled, or another fork answered
    /// already). A retransmitted 2xx only gets its ACK again.
    async fn on_outbound_2xx(
        &mut self,
        key: &ClientKey,
        d: DialogId,
        resp: &Response,
        now: Instant,
    ) {
        let tag = resp.to.tag().unwrap_or_default().to_owned();
        let Some((_, e)) = self.client.get(key) else {
            return;
        };
        let flow = e.flow;
        if let Some(ack) = e.acks.get(&tag).cloned() {
            debug!("2xx retransmitted; ACK sent again");
            self.transport.send(&flow, ack).await;
            return;
        }
        let Some(sent) = e.invite.clone() else {
            return;
        };
        let mut dialog = Dialog::from_uac(
            resp,
            sent.local_uri.clone(),
            sent.local_tag.clone(),
            &sent.uri,
            sent.cseq,
            flow,
        );
        let ack = dialog.ack(sent.cseq, self.local_for(flow.remote), &[]);
        self.transport.send(&flow, ack.clone()).await;
        if let Some((_, e)) = self.client.get_mut(key) {
            e.acks.insert(tag, ack);
        }
        let leg = self.outbound.remove(&d);
        let (id, events, wanted) = match leg {
            Some(leg) if leg.state.cancelled() || leg.events.tx.is_closed() => {
                info!(call_id = %sent.call_id, "2xx crossed our CANCEL; ACK and BYE");
                self.finish_leg(
                    leg,
                    LegEvent::Failed {
                        code: 487,
                        reason: "Request Terminated".into(),
                    },
                );
                (d, EventSink::Detached, false)
            }
            Some(leg) => (d, EventSink::Leg(leg.events), true),
            None => {
                info!(call_id = %sent.call_id, "2xx from another fork (or too late); ACK and BYE");
                (self.next_id(), EventSink::Detached, false)
            }
        };
        if !wanted {
            dialog.state = DialogState::Terminating;
        }
        let tag_key = (dialog.call_id.clone(), dialog.local_tag.clone());
        let body = resp.body.clone();
        self.by_local_tag.entry(tag_key).or_insert(id);
        self.insert_dialog(
            id,
            DialogEntry {
                dialog,
                events,
                invite: None,
                last_invite: None,
                reoffers: HashMap::new(),
                bye_pending: false,
                ack_body: Bytes::new(),
                session: None,
                session_due: None,
                local_sdp: Bytes::new(),
                counted: None,
            },
        );
        if wanted {
            info!(call_id = %sent.call_id, "outbound call answered");
            self.dialog_answered(id, body);
        } else {
            self.send_bye(id, now).await;
        }
    }

    fn dialog_answered(&mut self, d: DialogId, sdp: Bytes) {
        let Some(DialogEntry {
            events: EventSink::Leg(q),
            ..
        }) = self.dialogs.get_mut(&d)
        else {
            return;
        };
        match q.push(LegEvent::Answered { sdp }) {
            Queued::Taken => {}
            Queued::NeedsWaiter => {
                let tx = q.tx.clone();
                self.wait_for_room(d, tx);
            }
            Queued::Overflow => self.backlogged.push(d),
            Queued::Gone => debug!("outbound call not listening; answer dropped"),
        }
    }

    // ---- client side ------------------------------------------------------------------------

    async fn on_response(&mut self, resp: Response) {
        let now = Self::now();
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
        self.apply_client(id, out, Some(&resp), now).await;
    }

    async fn apply_client(
        &mut self,
        id: u64,
        out: Vec<Output>,
        resp: Option<&Response>,
        now: Instant,
    ) {
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
                        self.transport.send(&e.flow, b).await;
                    }
                }
                Output::Deliver => {
                    if let Some(resp) = resp {
                        self.on_client_deliver(&key, resp, now).await;
                    }
                }
                Output::Timeout(_) => self.on_client_timeout(&key),
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
            self.timers.push(Reverse((at, TimerRef::Client(id))));
        }
    }

    /// A response the client transaction passes up.
    async fn on_client_deliver(&mut self, key: &ClientKey, resp: &Response, now: Instant) {
        let Some((_, e)) = self.client.get(key) else {
            return;
        };
        let (kind, dialog, req, method) = (e.kind, e.dialog, e.req, e.method.clone());
        if kind == ClientKind::TrunkRegister {
            if resp.code >= 200 {
                self.on_trunk_register_final(key, resp, now).await;
            }
            return;
        }
        let Some(d) = dialog else {
            return;
        };
        match kind {
            ClientKind::Cancel | ClientKind::TrunkRegister => {}
            ClientKind::OutboundInvite => self.on_outbound_response(key, d, resp, now).await,
            ClientKind::InDialog => {
                if resp.code < 200 {
                    return;
                }
                if method == Method::Invite
                    && resp.code < 300
                    && !self.ack_in_dialog_2xx(key, d, resp).await
                {
                    return; // a retransmitted 2xx, ACKed again
                }
                if method == Method::Bye {
                    self.remove_dialog(d);
                } else if req == SESSION_REFRESH {
                    self.on_refresh_outcome(d, resp.code, now).await;
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

    /// ACK a 2xx to a re-INVITE we sent (§13.2.2.4). True the first time; a retransmitted 2xx
    /// gets the same ACK again and false.
    async fn ack_in_dialog_2xx(&mut self, key: &ClientKey, d: DialogId, resp: &Response) -> bool {
        let tag = resp.to.tag().unwrap_or_default().to_owned();
        let Some((_, e)) = self.client.get(key) else {
            return false;
        };
        let flow = e.flow;
        if let Some(ack) = e.acks.get(&tag).cloned() {
            self.transport.send(&flow, ack).await;
            return false;
        }
        let local = self.local_for(flow.remote);
        let Some(de) = self.dialogs.get_mut(&d) else {
            return true;
        };
        // A 2xx to a re-INVITE refreshes the remote target (§12.2.1.2).
        de.dialog.refresh_target(resp);
        let ack = de.dialog.ack(resp.cseq, local, &[]);
        self.transport.send(&flow, ack.clone()).await;
        if let Some((_, e)) = self.client.get_mut(key) {
            e.acks.insert(tag, ack);
        }
        true
    }

    /// A client transaction timed out (timer B or F): a 408 for its user (§8.1.3.1).
    fn on_client_timeout(&mut self, key: &ClientKey) {
        let Some((_, e)) = self.client.get(key) else {
            return;
        };
        let (kind, dialog, req, method) = (e.kind, e.dialog, e.req, e.method.clone());
        if kind == ClientKind::TrunkRegister {
            if let Some(t) = &mut self.trunk {
                t.on_timeout(Self::now(), &key.0);
            }
            self.after_trunk_change(Self::now());
            return;
        }
        let Some(d) = dialog else {
            return;
        };
        match kind {
            ClientKind::Cancel | ClientKind::TrunkRegister => debug!("CANCEL got no answer"),
            ClientKind::OutboundInvite => {
                let Some(leg) = self.outbound.remove(&d) else {
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
                    // Our refresh got no answer (§10): the call ends, and its BYE goes when the
                    // call lets the dialog go.
                    info!("session timer: the caller did not answer our refresh; ending the call");
                    if let Some(de) = self.dialogs.get_mut(&d) {
                        de.session = None;
                    }
                    self.dialog_event(d, DialogEvent::Bye);
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

    async fn on_timers(&mut self, now: Instant) {
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
                    self.apply_client(id, out, None, now).await;
                }
                TimerRef::Leg(d) => self.on_cancel_deadline(d, now),
                TimerRef::Registrar => self.on_registrar_timer(now),
                TimerRef::TrunkRegister => self.poll_trunk_registration(now).await,
                TimerRef::Session(d) => self.on_session_timer(d, now).await,
                TimerRef::CallLogSweep => self.sweep_call_logs(now),
            }
        }
        self.end_backlogged(now).await;
    }

    /// 64·T1 after our CANCEL and still no final response for the INVITE: give up (§9.1).
    fn on_cancel_deadline(&mut self, d: DialogId, now: Instant) {
        let due = self.outbound.get(&d).is_some_and(|leg| {
            leg.state == LegState::Cancelling && leg.cancel_deadline.is_some_and(|t| t <= now)
        });
        if !due {
            return;
        }
        let Some(leg) = self.outbound.remove(&d) else {
            return;
        };
        warn!("no final response to a cancelled INVITE; giving up on it");
        if let Some((id, _)) = self.client.remove(&leg.invite) {
            self.client_ids.remove(&id);
        }
        self.finish_leg(
            leg,
            LegEvent::Failed {
                code: 487,
                reason: "Request Terminated".into(),
            },
        );
    }
}

/// The address to name in Via and Contact towards a peer at `remote`: `advertised`, or, when
/// that is unspecified (bound to `0.0.0.0` or `[::]` with no `advertise_ip`), the local address
/// that routes to the peer, so that IPv6 peers get an IPv6 Contact.
fn local_for(advertised: SocketAddr, remote: SocketAddr) -> SocketAddr {
    if !advertised.ip().is_unspecified() {
        return advertised;
    }
    let ip = crate::sip::transport::local_ip_towards(remote.ip()).unwrap_or(advertised.ip());
    SocketAddr::new(ip, advertised.port())
}

/// What the trunk registration asks of our sockets.
struct UaNet<'a> {
    transport: &'a TransportHandle,
    advertised: SocketAddr,
}

impl Network for UaNet<'_> {
    fn local_for(&self, remote: SocketAddr) -> SocketAddr {
        local_for(self.advertised, remote)
    }

    fn is_open(&self, flow: &Flow) -> bool {
        self.transport.is_open(flow)
    }
}

/// Check an outbound target (a `sip:` URI, over UDP, or TCP where `tcp` allows it, that our
/// socket bound to `bound` can reach) and say where it goes: its IP literal, or `resolved`,
/// what its host name was looked up to.
fn outbound_target(
    target: &str,
    bound: SocketAddr,
    resolved: Option<SocketAddr>,
    tcp: bool,
) -> Result<SocketAddr, &'static str> {
    let scheme_ok = target
        .get(..4)
        .is_some_and(|s| s.eq_ignore_ascii_case("sip:"));
    if !scheme_ok {
        return Err("only sip: targets are supported");
    }
    if !clean_uri(target) {
        return Err("malformed target URI");
    }
    if let Some(value) = uri_transport(target) {
        if value != "udp" && !(tcp && value == "tcp") {
            return Err("only UDP is supported for outbound calls");
        }
    }
    let addr = match resolved {
        Some(a) => a,
        None => uri_socket_addr(target).ok_or("target host is not an IP address or a name")?,
    };
    if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err("target address is not usable");
    }
    if !crate::sip::resolve::reaches(bound, addr) {
        return Err(if bound.is_ipv4() {
            "target is IPv6 but SIP is bound to IPv4"
        } else {
            "target is IPv4 but SIP is bound to one IPv6 address"
        });
    }
    Ok(addr)
}

/// Whether the request has `Require: 100rel` (RFC 3262).
fn requires_100rel(req: &Request) -> bool {
    req.headers_named("Require")
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("100rel"))
}

/// No characters that would break out of a Request-URI or a `<...>`.
fn clean_uri(uri: &str) -> bool {
    !uri.chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"'))
}

/// Check an outbound target sent along a given flow ([`OutboundHandle::invite_via`]): a `sip:`
/// or `sips:` URI, and a flow our sockets can use.
fn via_flow(target: &str, flow: Flow, bound: SocketAddr) -> Result<Flow, &'static str> {
    let scheme_ok = target.split_once(':').is_some_and(|(s, rest)| {
        (s.eq_ignore_ascii_case("sip") || s.eq_ignore_ascii_case("sips")) && !rest.is_empty()
    });
    if !scheme_ok {
        return Err("only sip: targets are supported");
    }
    if !clean_uri(target) || target.len() > 512 {
        return Err("malformed target URI");
    }
    let addr = flow.remote;
    if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err("flow address is not usable");
    }
    if bound.is_ipv4() && addr.is_ipv6() {
        return Err("flow is IPv6 but SIP is bound to IPv4");
    }
    Ok(flow)
}

/// The user part of our From URI: RFC 3261 `user` characters as they are, the rest %-escaped.
fn escape_user(user: &str) -> String {
    let mut out = String::new();
    for b in user.trim().bytes().take(64) {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$,".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    if out.is_empty() {
        "anonymous".to_owned()
    } else {
        out
    }
}

/// Headers the UA writes itself on an outbound INVITE (compact forms are refused by length).
const OWN_HEADERS: &[&str] = &[
    "via",
    "from",
    "to",
    "call-id",
    "cseq",
    "contact",
    "route",
    "record-route",
    "max-forwards",
    "content-length",
    "content-type",
    "content-encoding",
    "user-agent",
];

/// An extra header for an outbound INVITE, made safe: the name must be a token of two or more
/// characters the UA does not write itself; control characters (CR, LF...) leave the value.
fn extra_header(name: &str, value: &str) -> Option<(String, String)> {
    let name = name.trim();
    let token = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b));
    if name.len() < 2 || !token || OWN_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) {
        return None;
    }
    let value: String = value.chars().filter(|c| !c.is_control()).collect();
    Some((name.to_owned(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::parse_datagram;
    use crate::sip::transport::{self, TransportLimits};
    use std::time::Duration;
    use tokio::net::UdpSocket;
    use tokio::time::timeout;
    use tokio_util::task::TaskTracker;

    /// A UA core driven by hand (no `run`), so that tests choose the time its timers see.
    struct Rig {
        ua: UaCore,
        inbound: mpsc::Receiver<Inbound>,
        /// Calls the UA core passes up (inbound INVITEs).
        app: mpsc::Receiver<AppEvent>,
        far: UdpSocket,
        target: String,
        _cancel: CancellationToken,
    }

    async fn rig() -> Rig {
        rig_with(|ua| ua).await
    }

    /// A rig whose UA core lets agent 1001 (password "pw") log in.
    async fn rig_with_agent() -> Rig {
        rig_with(|ua| ua.with_agents("ivr311", [("1001".to_owned(), "pw".to_owned())], &[])).await
    }

    async fn rig_with(setup: impl FnOnce(UaCore) -> UaCore) -> Rig {
        let (in_tx, inbound) = mpsc::channel(64);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let t = transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            TransportLimits::default(),
            in_tx,
            &tracker,
            cancel.clone(),
        )
        .await
        .unwrap();
        let (app_tx, app) = mpsc::channel(4);
        let ua = setup(UaCore::new(
            t.clone(),
            t.local_addr(),
            "ivr311-test".into(),
            app_tx,
        ));
        let far = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = format!("sip:911@{}", far.local_addr().unwrap());
        Rig {
            ua,
            inbound,
            app,
            far,
            target,
            _cancel: cancel,
        }
    }

    impl Rig {
        async fn invite(&mut self) -> (DialogId, mpsc::Receiver<LegEvent>) {
            let (events, rx) = mpsc::channel(64);
            let (reply, reply_rx) = oneshot::channel();
            let target = self.target.clone();
            self.ua
                .on_command(Command::Invite(Box::new(InviteCommand {
                    target,
                    via: None,
                    resolved: None,
                    from_user: "+15551234567".into(),
                    from_display: Some("Caller".into()),
                    headers: vec![],
                    sdp: Bytes::from_static(b"v=0\r\n"),
                    events,
                    reply,
                })))
                .await;
            (reply_rx.await.unwrap(), rx)
        }

        /// The next request the far end receives, with its source.
        async fn far_recv(&self) -> Option<(Request, SocketAddr)> {
            let mut buf = vec![0u8; 65535];
            let (n, from) = timeout(Duration::from_millis(300), self.far.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            match parse_datagram(&buf[..n], 65535) {
                Ok(Message::Request(r)) => Some((r, from)),
                _ => None,
            }
        }

        /// The far end answers `req`; the UA core takes the response in.
        async fn answer(&mut self, req: &Request, to: SocketAddr, code: u16, reason: &str) {
            let bytes = ResponseBuilder::new(req, code, reason, Some("far")).build();
            self.far.send_to(&bytes, to).await.unwrap();
            let m = timeout(Duration::from_secs(2), self.inbound.recv())
                .await
                .unwrap()
                .unwrap();
            self.ua.on_inbound(m).await;
        }
    }

    impl Rig {
        /// The far end sends `bytes` to the UA core, which takes them in.
        async fn far_send(&mut self, bytes: &[u8]) {
            let to = self.ua.transport.local_addr();
            self.far.send_to(bytes, to).await.unwrap();
            let m = timeout(Duration::from_secs(2), self.inbound.recv())
                .await
                .unwrap()
                .unwrap();
            self.ua.on_inbound(m).await;
        }

        /// The next response the far end receives.
        async fn far_response(&self) -> Option<Response> {
            let mut buf = vec![0u8; 65535];
            let (n, _) = timeout(Duration::from_millis(300), self.far.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            match parse_datagram(&buf[..n], 65535) {
                Ok(Message::Response(r)) => Some(r),
                _ => None,
            }
        }

        /// REGISTER from the far end as agent 1001; `auth` is an Authorization value.
        async fn register(&mut self, cseq: u32, auth: Option<&str>) -> Response {
            let from = self.far.local_addr().unwrap();
            let mut b = RequestBuilder::new(
                &Method::Register,
                "sip:127.0.0.1",
                "UDP",
                from,
                &new_branch(),
            )
            .header("From", "<sip:1001@127.0.0.1>;tag=reg")
            .header("To", "<sip:1001@127.0.0.1>")
            .header("Call-ID", "reg-1001")
            .header("CSeq", format_args!("{cseq} REGISTER"))
            .header("Contact", "<sip:1001@10.255.0.7:5062>");
            if let Some(a) = auth {
                b = b.header("Authorization", a);
            }
            self.far_send(&b.build()).await;
            self.far_response().await.expect("a response to REGISTER")
        }
    }

    /// The MD5 answer to the challenge in `resp`.
    fn md5_authorization(resp: &Response) -> String {
        use md5::{Digest, Md5};
        let h = |s: String| -> String {
            Md5::digest(s.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let challenge = resp
            .headers_named("WWW-Authenticate")
            .find(|v| v.contains("algorithm=MD5"))
            .expect("MD5 challenge");
        let param = |name: &str| {
            let at = challenge.find(&format!("{name}=\"")).expect("param") + name.len() + 2;
            let len = challenge[at..].find('"').expect("closing quote");
            challenge[at..at + len].to_owned()
        };
        let (nonce, opaque) = (param("nonce"), param("opaque"));
        let ha1 = h("1001:ivr311:pw".to_owned());
        let ha2 = h("REGISTER:sip:127.0.0.1".to_owned());
        let response = h(format!("{ha1}:{nonce}:00000001:abc:auth:{ha2}"));
        format!(
            "Digest username=\"1001\", realm=\"ivr311\", nonce=\"{nonce}\", uri=\"sip:127.0.0.1\", \
             response=\"{response}\", algorithm=MD5, qop=auth, nc=00000001, cnonce=\"abc\", \
             opaque=\"{opaque}\""
        )
    }

    #[tokio::test]
    async fn register_without_agents_is_forbidden() {
        let mut r = rig().await;
        let resp = r.register(1, None).await;
        assert_eq!(resp.code, 403);
        assert_eq!(r.ua.allow(), ALLOW);
    }

    #[tokio::test]
    async fn agent_logs_in_is_reachable_through_its_flow_and_expires() {
        let mut r = rig_with_agent().await;
        let mut events = r.ua.agent_events();
        let contacts = r.ua.agent_contacts();
        assert_eq!(r.ua.allow(), ALLOW_WITH_REGISTER);
        let challenge = r.register(1, None).await;
        assert_eq!(challenge.code, 401);
        assert_eq!(challenge.headers_named("WWW-Authenticate").count(), 2);
        let ok = r.register(2, Some(&md5_authorization(&challenge))).await;
        assert_eq!(ok.code, 200, "{ok:?}");
        assert_eq!(ok.contacts()[0].uri, "sip:1001@10.255.0.7:5062");
        let far = r.far.local_addr().unwrap();
        let Ok(AgentEvent::LoggedIn {
            agent,
            contact,
            flow,
        }) = events.try_recv()
        else {
            panic!("LoggedIn expected");
        };
        assert_eq!(
            (agent.as_str(), contact.as_str()),
            ("1001", "sip:1001@10.255.0.7:5062")
        );
        assert_eq!(flow.remote, far);
        assert_eq!(
            contacts.get("1001").map(|c| c.value().clone()),
            Some((contact.clone(), flow))
        );

        // An INVITE to the agent goes along the flow, with the registered contact as target.
        let (reply, reply_rx) = oneshot::channel();
        let (ev_tx, _leg) = mpsc::channel(8);
        r.ua.on_command(Command::Invite(Box::new(InviteCommand {
            target: contact.clone(),
            via: Some(flow),
            resolved: None,
            from_user: "+15551234567".into(),
            from_display: None,
            headers: vec![],
            sdp: Bytes::from_static(b"v=0\r\n"),
            events: ev_tx,
            reply,
        })))
        .await;
        assert!(reply_rx.await.is_ok());
        let Some((inv, _)) = r.far_recv().await else {
            panic!("INVITE expected at the registration's address")
        };
        assert_eq!(inv.method, Method::Invite);
        assert_eq!(inv.uri, "sip:1001@10.255.0.7:5062");

        // The binding runs out on the timer heap.
        assert!(r.ua.registrar_timer.is_some());
        r.ua.on_timers(Instant::now() + Duration::from_secs(3601))
            .await;
        assert!(matches!(
            events.try_recv(),
            Ok(AgentEvent::LoggedOut { agent }) if agent == "1001"
        ));
        assert!(contacts.is_empty());
    }

    #[tokio::test]
    async fn invite_via_refuses_unusable_flows() {
        let mut r = rig().await;
        for (target, remote) in [
            ("sip:1001@10.0.0.1", "[::1]:5060"),
            ("sip:1001@10.0.0.1", "127.0.0.1:0"),
            ("tel:1001", "127.0.0.1:5060"),
            ("sip:1001@10.0.0.1>\r\nX: y", "127.0.0.1:5060"),
        ] {
            let (reply, _) = oneshot::channel();
            let (ev_tx, mut events) = mpsc::channel(8);
            r.ua.on_command(Command::Invite(Box::new(InviteCommand {
                target: target.into(),
                via: Some(Flow {
                    transport: Transport::Udp,
                    remote: remote.parse().unwrap(),
                    conn: 0,
                }),
                resolved: None,
                from_user: "x".into(),
                from_display: None,
                headers: vec![],
                sdp: Bytes::new(),
                events: ev_tx,
                reply,
            })))
            .await;
            assert!(
                matches!(events.try_recv(), Ok(LegEvent::Failed { code: 503, .. })),
                "{target} via {remote}"
            );
        }
        assert!(r.ua.client.is_empty());
    }

    /// The far end answers `req` with `code` and a digest challenge in `header`.
    async fn challenge(r: &mut Rig, req: &Request, to: SocketAddr, code: u16, header: &str) {
        let value = "Digest realm=\"trunk\", nonce=\"n1\", qop=\"auth\"";
        challenge_with(r, req, to, code, header, value).await;
    }

    async fn challenge_with(
        r: &mut Rig,
        req: &Request,
        to: SocketAddr,
        code: u16,
        header: &str,
        value: &str,
    ) {
        let bytes = ResponseBuilder::new(req, code, "Authentication Required", Some("far"))
            .header(header, value)
            .build();
        r.far.send_to(&bytes, to).await.unwrap();
        let m = timeout(Duration::from_secs(2), r.inbound.recv())
            .await
            .unwrap()
            .unwrap();
        r.ua.on_inbound(m).await;
    }

    /// The next request of `method` the far end receives (skipping the ACKs of finals).
    async fn far_request(r: &Rig, method: Method) -> Option<(Request, SocketAddr)> {
        loop {
            let (req, from) = r.far_recv().await?;
            if req.method == method {
                return Some((req, from));
            }
        }
    }

    /// A rig with trunk credentials (user `city`) whose INVITE the far end challenged once
    /// with `code` and `header`: the leg's events, the first INVITE, and the one sent again
    /// (with where it came from).
    async fn challenged_once(
        code: u16,
        header: &str,
    ) -> (Rig, mpsc::Receiver<LegEvent>, Request, Request, SocketAddr) {
        let creds = crate::sip::registrar::Credentials {
            username: "city".into(),
            password: "pw".into(),
            realm: None,
        };
        let mut r = rig_with(|ua| ua.with_trunk_auth(creds.into())).await;
        let (_, events) = r.invite().await;
        let (inv, src) = far_request(&r, Method::Invite).await.expect("INVITE");
        challenge(&mut r, &inv, src, code, header).await;
        let (again, src) = far_request(&r, Method::Invite).await.expect("INVITE again");
        (r, events, inv, again, src)
    }

    #[tokio::test]
    async fn a_challenged_trunk_invite_is_sent_once_more_with_credentials_then_fails() {
        let (mut r, mut events, inv, again, src) = challenged_once(401, "WWW-Authenticate").await;
        assert_eq!(
            (again.call_id.as_str(), again.cseq),
            (inv.call_id.as_str(), 2)
        );
        assert_ne!(
            again.vias[0].branch, inv.vias[0].branch,
            "a new transaction"
        );
        let auth = again.header("Authorization").expect("Authorization");
        assert!(
            auth.contains("username=\"city\"") && auth.contains("realm=\"trunk\""),
            "{auth}"
        );
        assert!(events.try_recv().is_err(), "the leg goes on");
        // Challenged again (a wrong password): no third try; the leg fails with the code.
        challenge(&mut r, &again, src, 401, "WWW-Authenticate").await;
        match events.try_recv() {
            Ok(LegEvent::Failed { code: 401, .. }) => {}
            other => panic!("expected Failed 401, got {other:?}"),
        }
        assert!(far_request(&r, Method::Invite).await.is_none());
    }

    #[tokio::test]
    async fn a_stale_nonce_on_the_retried_invite_is_answered_once_more() {
        let (mut r, mut events, _, again, src) = challenged_once(407, "Proxy-Authenticate").await;
        // The nonce expired between the two (RFC 7616 §3.3): answered with the new one.
        let stale = "Digest realm=\"trunk\", nonce=\"n2\", qop=\"auth\", stale=true";
        challenge_with(&mut r, &again, src, 407, "Proxy-Authenticate", stale).await;
        let (third, src) = far_request(&r, Method::Invite)
            .await
            .expect("a third INVITE");
        assert_eq!(third.cseq, 3);
        let auth = third.header("Proxy-Authorization").expect("credentials");
        assert!(auth.contains("nonce=\"n2\""), "{auth}");
        assert!(events.try_recv().is_err(), "the leg goes on");
        // Stale again: no loop.
        challenge_with(&mut r, &third, src, 407, "Proxy-Authenticate", stale).await;
        match events.try_recv() {
            Ok(LegEvent::Failed { code: 407, .. }) => {}
            other => panic!("expected Failed 407, got {other:?}"),
        }
        assert!(far_request(&r, Method::Invite).await.is_none());
    }

    #[tokio::test]
    async fn without_trunk_credentials_a_407_fails_the_leg() {
        let mut r = rig().await;
        let (_, mut events) = r.invite().await;
        let (inv, src) = far_request(&r, Method::Invite).await.expect("INVITE");
        challenge(&mut r, &inv, src, 407, "Proxy-Authenticate").await;
        match events.try_recv() {
            Ok(LegEvent::Failed { code: 407, .. }) => {}
            other => panic!("expected Failed 407, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn no_answer_fails_with_408_on_timer_b() {
        let mut r = rig().await;
        let (_, mut events) = r.invite().await;
        let Some((inv, _)) = r.far_recv().await else {
            panic!("INVITE expected")
        };
        assert_eq!(inv.method, Method::Invite);
        r.ua.on_timers(Instant::now() + Duration::from_secs(31))
            .await;
        assert!(events.try_recv().is_err(), "nothing before 64*T1");
        r.ua.on_timers(Instant::now() + Duration::from_secs(33))
            .await;
        match events.try_recv() {
            Ok(LegEvent::Failed { code: 408, .. }) => {}
            other => panic!("expected Failed 408, got {other:?}"),
        }
        assert!(r.ua.outbound.is_empty());
        assert!(r.ua.client.is_empty());
    }

    #[tokio::test]
    async fn ringing_outlives_timer_b_until_cancelled_then_gives_up_after_64_t1() {
        let mut r = rig().await;
        let (d, mut events) = r.invite().await;
        let Some((inv, src)) = r.far_recv().await else {
            panic!("INVITE expected")
        };
        r.answer(&inv, src, 180, "Ringing").await;
        assert!(matches!(
            events.try_recv(),
            Ok(LegEvent::Provisional {
                code: 180,
                sdp: None
            })
        ));
        // Timer B is not allowed to end a ringing call.
        r.ua.on_timers(Instant::now() + Duration::from_secs(40))
            .await;
        assert!(events.try_recv().is_err());
        assert!(r.ua.outbound.contains_key(&d));
        // Cancel: a CANCEL with the INVITE's branch and CSeq number.
        r.ua.on_command(Command::Hangup { dialog: d }).await;
        let Some((cancel, _)) = r.far_recv().await else {
            panic!("CANCEL expected")
        };
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(cancel.top_via().branch, inv.top_via().branch);
        assert_eq!(cancel.cseq, inv.cseq);
        assert_eq!(cancel.uri, inv.uri);
        assert_eq!(cancel.to.tag(), None);
        // The far end never answers: 64*T1 later the UA gives up on the INVITE.
        r.ua.on_timers(Instant::now() + Duration::from_secs(20))
            .await;
        assert!(events.try_recv().is_err());
        r.ua.on_timers(Instant::now() + Duration::from_secs(33))
            .await;
        match events.try_recv() {
            Ok(LegEvent::Failed { code: 487, .. }) => {}
            other => panic!("expected Failed 487, got {other:?}"),
        }
        assert!(r.ua.outbound.is_empty());
        assert!(r.ua.client.is_empty());
    }

    #[tokio::test]
    async fn cancel_before_any_provisional_waits_for_one() {
        let mut r = rig().await;
        let (d, mut events) = r.invite().await;
        let Some((inv, src)) = r.far_recv().await else {
            panic!("INVITE expected")
        };
        r.ua.on_command(Command::Drop { dialog: d }).await;
        assert!(
            r.far_recv().await.is_none(),
            "no CANCEL before a provisional"
        );
        r.answer(&inv, src, 100, "Trying").await;
        assert!(events.try_recv().is_err(), "100 is not reported");
        let Some((cancel, _)) = r.far_recv().await else {
            panic!("CANCEL expected after the 100")
        };
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(cancel.top_via().branch, inv.top_via().branch);
    }

    #[tokio::test]
    async fn cancel_pending_and_no_response_at_all_reports_487() {
        let mut r = rig().await;
        let (d, mut events) = r.invite().await;
        assert!(r.far_recv().await.is_some());
        r.ua.on_command(Command::Hangup { dialog: d }).await;
        r.ua.on_timers(Instant::now() + Duration::from_secs(33))
            .await;
        match events.try_recv() {
            Ok(LegEvent::Failed { code: 487, .. }) => {}
            other => panic!("expected Failed 487, got {other:?}"),
        }
    }

    #[test]
    fn a_target_asks_for_tcp_with_its_transport_parameter_only() {
        assert!(wants_tcp("sip:911@192.0.2.1;transport=tcp"));
        assert!(wants_tcp("sip:911@psap.example.gov:5060;Transport=TCP;lr"));
        assert!(!wants_tcp("sip:911@192.0.2.1;transport=tcpx"));
        assert!(!wants_tcp("sip:911@192.0.2.1;transport=udp"));
        assert!(!wants_tcp("sip:tcp@192.0.2.1"));
    }

    #[tokio::test]
    async fn unusable_targets_fail_with_503_at_once() {
        let mut r = rig().await;
        for target in [
            "sip:911@psap.example.org",
            "tel:911",
            "sip:911@127.0.0.1:5080;transport=tcp",
            "sip:911@[::1]:5080",
            "sip:911@127.0.0.1:5080>\r\nX: y",
        ] {
            r.target = target.to_owned();
            let (_, mut events) = r.invite().await;
            match events.try_recv() {
                Ok(LegEvent::Failed { code: 503, .. }) => {}
                other => panic!("{target}: expected Failed 503, got {other:?}"),
            }
        }
        assert!(r.ua.outbound.is_empty());
        assert!(r.ua.client.is_empty());
    }

    #[test]
    fn from_user_is_escaped_and_extra_headers_are_checked() {
        assert_eq!(escape_user("+1 (555) 123"), "+1%20(555)%20123");
        assert_eq!(escape_user("a@b;c"), "a%40b%3Bc");
        assert_eq!(escape_user(""), "anonymous");
        assert_eq!(
            extra_header("X-311-Case", "42\r\nVia: evil"),
            Some(("X-311-Case".to_owned(), "42Via: evil".to_owned()))
        );
        assert_eq!(extra_header("Call-ID", "x"), None);
        assert_eq!(extra_header("f", "x"), None);
        assert_eq!(extra_header("Bad Name", "x"), None);
        assert!(extra_header("P-Asserted-Identity", "<sip:+15551234567@city>").is_some());
    }

    /// The far end calls us with `extra` session-timer headers; we answer 200 (and the far end
    /// ACKs when `ack`). Returns the call and our 200 (or the final response we sent).
    async fn called_with(r: &mut Rig, extra: &str, ack: bool) -> (Option<IncomingCall>, Response) {
        let ua = r.ua.transport.local_addr();
        let far = r.far.local_addr().unwrap();
        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
        let inv = format!(
            "INVITE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKst1\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=c1\r\nTo: <sip:311@{ua}>\r\nCall-ID: st1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:caller@{far}>\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        );
        r.far_send(inv.as_bytes()).await;
        let first = r.far_response().await.expect("a response");
        if first.code >= 200 {
            return (None, first);
        }
        let Ok(AppEvent::Invite(mut call)) = r.app.try_recv() else {
            panic!("no call passed up")
        };
        let body = Bytes::from_static(sdp.as_bytes());
        r.ua.respond_invite(
            call.handle.id,
            200,
            "OK",
            vec![],
            Some(("application/sdp".into(), body)),
            Instant::now(),
        )
        .await;
        let ok = r.far_response().await.expect("200");
        if ack {
            let to = ok.to.raw.clone();
            let ack = format!(
                "ACK sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKst1ack\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=c1\r\nTo: {to}\r\nCall-ID: st1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
            );
            r.far_send(ack.as_bytes()).await;
            assert!(matches!(
                call.events.try_recv(),
                Ok(DialogEvent::Confirmed { .. })
            ));
        }
        (Some(call), ok)
    }

    #[tokio::test]
    async fn a_carriers_session_timer_is_agreed_refreshed_and_a_silent_caller_hung_up() {
        let mut r = rig().await;
        let t0 = Instant::now();
        let (call, ok) = called_with(
            &mut r,
            "Supported: timer\r\nRequire: timer\r\nSession-Expires: 120;refresher=uac\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n",
            true,
        )
        .await;
        let mut call = call.unwrap();
        assert_eq!(ok.code, 200, "Require: timer is no longer refused");
        assert_eq!(ok.header("Session-Expires"), Some("120;refresher=uac"));
        assert_eq!(ok.header("Require"), Some("timer"));
        // The carrier refreshes by UPDATE, asking for 600 s from now on.
        let ua = r.ua.transport.local_addr();
        let far = r.far.local_addr().unwrap();
        let update = format!(
            "UPDATE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKst2\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=c1\r\nTo: {}\r\nCall-ID: st1\r\nCSeq: 2 UPDATE\r\n\
Supported: timer\r\nSession-Expires: 600;refresher=uac\r\nContent-Length: 0\r\n\r\n",
            ok.to.raw
        );
        r.far_send(update.as_bytes()).await;
        let Ok(DialogEvent::Reoffer { txn, .. }) = call.events.try_recv() else {
            panic!("the UPDATE reaches the call")
        };
        r.ua.on_command(Command::ReofferAnswer {
            dialog: call.handle.id,
            txn,
            code: 200,
            body: None,
        })
        .await;
        let refreshed = r.far_response().await.expect("200 to UPDATE");
        assert_eq!(
            refreshed.header("Session-Expires"),
            Some("600;refresher=uac")
        );
        // Without that refresh the call would have ended 88 s in (120 - 32); it does not.
        r.ua.on_timers(t0 + Duration::from_secs(100)).await;
        assert!(r.far_recv().await.is_none(), "nothing sent yet");
        assert!(call.events.try_recv().is_err());
        // No refresh after that: 568 s on, BYE to the caller, and the call hears it ended.
        r.ua.on_timers(t0 + Duration::from_secs(600)).await;
        let (bye, _) = r.far_recv().await.expect("BYE");
        assert_eq!(bye.method, Method::Bye);
        assert!(matches!(call.events.try_recv(), Ok(DialogEvent::Bye)));
    }

    #[tokio::test]
    async fn we_refresh_when_asked_and_a_caller_that_forgot_the_call_is_hung_up() {
        let mut r = rig().await;
        let t0 = Instant::now();
        let (call, ok) = called_with(
            &mut r,
            "Supported: timer\r\nSession-Expires: 120;refresher=uas\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n",
            true,
        )
        .await;
        let mut call = call.unwrap();
        assert_eq!(ok.header("Session-Expires"), Some("120;refresher=uas"));
        r.ua.on_timers(t0 + Duration::from_secs(59)).await;
        assert!(r.far_recv().await.is_none(), "not before half the interval");
        r.ua.on_timers(t0 + Duration::from_secs(61)).await;
        let (update, src) = r.far_recv().await.expect("our refresh");
        assert_eq!(update.method, Method::Update);
        assert_eq!(update.header("Session-Expires"), Some("120;refresher=uas"));
        assert!(update.body.is_empty());
        // The far end no longer knows the call.
        r.answer(&update, src, 481, "Call/Transaction Does Not Exist")
            .await;
        assert!(matches!(call.events.try_recv(), Ok(DialogEvent::Bye)));
        let (bye, _) = r.far_recv().await.expect("BYE");
        assert_eq!(bye.method, Method::Bye);
    }

    #[tokio::test]
    async fn without_update_our_refresh_is_a_reinvite_with_the_same_sdp() {
        let mut r = rig().await;
        let t0 = Instant::now();
        // A proxy asked for a timer the caller knows nothing of: we refresh, by re-INVITE.
        let (call, ok) = called_with(&mut r, "Session-Expires: 100\r\n", true).await;
        assert!(call.is_some());
        assert_eq!(ok.header("Session-Expires"), Some("100;refresher=uas"));
        assert_eq!(
            ok.header("Require"),
            None,
            "the caller does not support timers"
        );
        r.ua.on_timers(t0 + Duration::from_secs(51)).await;
        let (reinvite, _) = r.far_recv().await.expect("our refresh");
        assert_eq!(reinvite.method, Method::Invite);
        assert_eq!(reinvite.body, ok.body, "the SDP of our 200, unchanged");
    }

    #[tokio::test]
    async fn an_interval_under_90_s_gets_422_with_min_se() {
        let mut r = rig().await;
        let (call, refused) =
            called_with(&mut r, "Supported: timer\r\nSession-Expires: 60\r\n", false).await;
        assert!(call.is_none());
        assert_eq!(refused.code, 422);
        assert_eq!(refused.header("Min-SE"), Some("90"));
    }

    #[tokio::test]
    async fn invites_over_a_sources_limit_get_a_stateless_503_and_its_calls_count_until_they_end() {
        let metrics = Arc::new(Metrics::default());
        let mut r = rig_with(|ua| {
            ua.with_screening(
                Screening {
                    max_calls_per_source: 1,
                    invites_per_second: 100,
                    invites_burst: 100,
                    ..Screening::default()
                },
                metrics.clone(),
            )
        })
        .await;
        let ua = r.ua.transport.local_addr();
        let far = r.far.local_addr().unwrap();
        let invite = |n: u32| {
            format!(
                "INVITE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKlim{n}\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=l{n}\r\nTo: <sip:311@{ua}>\r\nCall-ID: lim{n}\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:caller@{far}>\r\nContent-Length: 0\r\n\r\n"
            )
        };
        r.far_send(invite(1).as_bytes()).await;
        assert_eq!(r.far_response().await.map(|x| x.code), Some(100));
        let Ok(AppEvent::Invite(call)) = r.app.try_recv() else {
            panic!("the first call is passed up")
        };
        let held = r.ua.server.len();
        // The second call from the same source: 503 with Retry-After, no transaction, no call.
        r.far_send(invite(2).as_bytes()).await;
        let refused = r.far_response().await.expect("an answer");
        assert_eq!(refused.code, 503);
        assert_eq!(refused.header("Retry-After"), Some("10"));
        assert!(refused.to.tag().is_some());
        assert_eq!(r.ua.server.len(), held, "no transaction kept for a refusal");
        assert!(r.app.try_recv().is_err());
        assert_eq!(
            metrics.get(
                "ivr311_sip_invites_limited_total",
                &[("limit", "calls_per_source")]
            ),
            1
        );
        // The first call is refused by its task: its source may call again.
        r.ua.respond_invite(
            call.handle.id,
            486,
            "Busy Here",
            vec![],
            None,
            Instant::now(),
        )
        .await;
        assert_eq!(r.far_response().await.map(|x| x.code), Some(486));
        r.far_send(invite(3).as_bytes()).await;
        assert_eq!(r.far_response().await.map(|x| x.code), Some(100));
    }
}
