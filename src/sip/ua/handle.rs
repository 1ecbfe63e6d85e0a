//! What calls hold to act on their dialogs and to start outbound calls: [`DialogHandle`],
//! [`OutboundHandle`], and the [`Command`]s they queue to the UA task.
//!
//! The handles run in the caller's task: an outbound target's host name is looked up and a
//! `transport=tcp` target's connection opened here, before the INVITE is handed over, so the
//! UA task never waits on DNS or a connection. Nothing here touches the UA core's state.

use super::events::LegEvent;
use super::DialogId;
use crate::logging::LogConfig;
use crate::sip::message::{uri_socket_addr, wants_tcp, Method};
use crate::sip::resolve::Resolver;
use crate::sip::transport::{Flow, TransportHandle};
use bytes::Bytes;
use std::net::SocketAddr;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// An outbound call just started by [`OutboundHandle::invite`].
#[derive(Debug)]
pub struct OutboundCall {
    /// The leg's handle: `hangup` CANCELs while ringing and BYEs once answered; `request`,
    /// `answer_reoffer` and `release` work as for inbound dialogs once answered. `release`
    /// CANCELs a leg that has not been answered yet.
    pub handle: DialogHandle,
    pub events: mpsc::Receiver<LegEvent>,
}

/// Starts outbound calls through the UA core. Cloneable; get one from [`super::UaCore::outbound`].
#[derive(Debug, Clone)]
pub struct OutboundHandle {
    pub(super) tx: mpsc::Sender<Command>,
    /// Our SIP socket's address: a target's host name is looked up in its family.
    pub(super) bound: SocketAddr,
    /// Looks a target's host name up ([`super::UaCore::with_resolver`]).
    pub(super) resolver: Resolver,
    /// Opens the TCP connection a `transport=tcp` target asks for.
    pub(super) transport: TransportHandle,
    /// How log lines show a target's user part (a call-back's is the caller's number).
    pub(super) log: LogConfig,
}

impl OutboundHandle {
    /// Send an INVITE with our SDP offer `sdp` to `target`, a `sip:` URI whose host is an IP
    /// literal or a name (e.g. `sip:911@127.0.0.1:5080`, `sip:911@psap.example.gov`; no port
    /// means 5060). A name is looked up first (A/AAAA, see [`crate::sip::resolve`]); one that
    /// does not resolve fails at once with [`LegEvent::Failed`] 503. A target with
    /// `;transport=tcp` (a PSAP's ESInet border, a carrier that takes TCP only) goes over a TCP
    /// connection we open (`TransportHandle::connect_tcp`); one that cannot be opened within
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
    pub(crate) async fn destinations(&self, target: &str) -> Result<Vec<SocketAddr>, String> {
        self.resolver.resolve_all(target.trim(), self.bound).await
    }

    /// [`OutboundHandle::invite`] to a `destination` [`OutboundHandle::destinations`] gave
    /// for `target` (a failed lookup fails the call at once with 503, as there).
    pub(crate) async fn invite_to(
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
    /// ([`crate::sip::registrar::AgentEvent::LoggedIn`], [`super::UaCore::agent_contacts`]). Phones behind NAT register a
    /// private Contact; the flow (the address and port, or the TCP connection, the REGISTER
    /// came from) is the path that reaches them. `target` is only the Request-URI (and To): any
    /// `sip:`/`sips:` URI, its host need not be an IP address. A flow the UA cannot use (IPv6
    /// while SIP is bound to IPv4, port 0...) fails at once with 503; a TCP connection that has
    /// closed shows as no answer (408).
    pub(crate) async fn invite_via(
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
pub(super) struct InviteCommand {
    pub(super) target: String,
    /// Send along this flow instead of to the target's host ([`OutboundHandle::invite_via`]).
    pub(super) via: Option<Flow>,
    /// The address the target's host name was looked up to.
    pub(super) resolved: Option<SocketAddr>,
    pub(super) from_user: String,
    pub(super) from_display: Option<String>,
    pub(super) headers: Vec<(String, String)>,
    pub(super) sdp: Bytes,
    pub(super) events: mpsc::Sender<LegEvent>,
    pub(super) reply: oneshot::Sender<DialogId>,
}

/// Commands from a call to the UA core.
#[derive(Debug)]
pub(super) enum Command {
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
    /// The call's answer to a request passed up for it to answer (REFER).
    AnswerRequest {
        dialog: DialogId,
        txn: u64,
        code: u16,
        headers: Vec<(String, String)>,
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
    pub(super) tx: mpsc::Sender<Command>,
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

    /// Answer a request the dialog passed up for the call to answer ([`super::DialogEvent::Refer`]):
    /// `code` with its usual reason phrase and `headers` (a `Warning` with a refusal).
    pub async fn answer_request(&self, txn: u64, code: u16, headers: Vec<(String, String)>) {
        let _ = self
            .tx
            .send(Command::AnswerRequest {
                dialog: self.id,
                txn,
                code,
                headers,
            })
            .await;
    }

    /// Send a request inside the dialog (REFER, INFO...); the outcome arrives as
    /// [`super::DialogEvent::RequestOutcome`] with `req`.
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
