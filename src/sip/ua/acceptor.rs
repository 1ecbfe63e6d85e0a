//! Inbound requests: screening, new calls (INVITE), CANCEL, ACK, requests inside the dialogs
//! of calls we answer, and the call's answers (its responses to the INVITE, to re-INVITEs and
//! UPDATEs).
//!
//! Owns the screening state ([`Acceptor`]: the trunk allow-list, the per-source rate limit of
//! out-of-dialog requests, the per-source call limits) and the refusals that need no call (420,
//! 422, 415, 406, 481, 405, 501, the stateless 503). Sans-IO like the rest of [`Core`]: it
//! queues what to send and never waits. It does not send requests of its own (that is
//! [`super::core`]'s `send_request`) and never touches an outbound leg.

use super::core::{Core, DialogEntry, ServerEntry, ServerKey, TimerRef};
use super::events::{AppEvent, DialogEvent, EventQueue, EventSink, IncomingCall, Refer};
use super::handle::DialogHandle;
use super::DialogId;
use super::Screening;
use crate::sip::dialog::{contact_uri, Dialog, DialogState};
use crate::sip::guard::{self, CallLimiter, CallVerdict, IpNet, LogVerdict, RateLimiter};
use crate::sip::message::{Method, Request, ResponseBuilder};
use crate::sip::registrar::CallAuth;
use crate::sip::session_timer::{self, SessionTimer};
use crate::sip::transport::Flow;
use bytes::Bytes;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The acceptor's own state: what new requests are screened with.
pub(super) struct Acceptor {
    /// Source networks INVITEs are taken from (empty: any); they are trusted trunks.
    pub(super) trunks_allow: Vec<IpNet>,
    /// Per-source limit on out-of-dialog requests other than INVITE.
    pub(super) limiter: RateLimiter,
    /// Per-source limits on new calls from sources not in `trunks_allow`.
    pub(super) calls: CallLimiter,
    /// A sweep of `calls`' log windows is on the timers table.
    pub(super) sweep_due: bool,
}

impl Default for Acceptor {
    /// Screens nothing.
    fn default() -> Self {
        Acceptor::new(Screening::default())
    }
}

impl Acceptor {
    pub(super) fn new(screening: Screening) -> Self {
        Acceptor {
            trunks_allow: screening.trunks_allow,
            limiter: RateLimiter::new(screening.per_second, screening.burst, guard::MAX_SOURCES),
            calls: CallLimiter::new(
                screening.max_calls_per_source,
                screening.invites_per_second,
                screening.invites_burst,
                CALL_LOG_WINDOW,
            ),
            sweep_due: false,
        }
    }

    /// What to do with a new request (not ACK, CANCEL or a retransmission) from `source`:
    /// requests inside a dialog we hold (`in_dialog`) always pass; an INVITE outside one from
    /// a source that is not a trusted trunk counts against its source's call limits (or is
    /// refused by them).
    pub(super) fn screen(
        &mut self,
        req: &Request,
        source: IpAddr,
        in_dialog: bool,
        now: Instant,
    ) -> Screened {
        if in_dialog {
            return Screened::Pass;
        }
        if req.header("User-Agent").is_some_and(guard::is_scanner) {
            return Screened::Drop("scanner");
        }
        if req.method == Method::Invite {
            if !guard::allowed(&self.trunks_allow, source) {
                return Screened::Drop("source_not_allowed");
            }
            if req.to.tag().is_some() {
                // A re-INVITE for a dialog we do not hold: answered 481, no call to count.
                return Screened::Pass;
            }
            if self.trunks_allow.iter().any(|n| n.contains(source)) {
                return Screened::Pass;
            }
            return match self.calls.admit(source, now) {
                CallVerdict::Admit => Screened::Admitted,
                CallVerdict::Refuse {
                    limit,
                    retry_after,
                    answer,
                    log,
                } => Screened::Refuse(Refusal {
                    limit,
                    retry_after,
                    answer,
                    log,
                }),
            };
        }
        // A listed trunk (the carrier, or the edge proxy in front of several nodes, which
        // relays every operator's REGISTER and every probe from one address) is not rate
        // limited: it is the infrastructure, and its bursts are everyone's requests.
        if self.trunks_allow.iter().any(|n| n.contains(source)) || self.limiter.allow(source, now) {
            Screened::Pass
        } else {
            Screened::Drop("rate_limited")
        }
    }
}

/// The summary line of a log window of refused calls that ended with refusals unlogged.
pub(super) fn log_calls_suppressed(s: &guard::Suppressed) {
    let from = s.from();
    let secs = s.over.as_secs_f64().round() as u64;
    warn!(
        source = %from,
        suppressed = s.count,
        "{} more calls from {from} refused by per-source limits in the last {secs}s",
        s.count
    );
}

/// How long after a source's first refused INVITE is logged its further ones are only counted.
pub(super) const CALL_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// What [`Acceptor::screen`] does with a new request.
#[derive(Debug, PartialEq)]
pub(super) enum Screened {
    /// Handle it.
    Pass,
    /// A new call from an untrusted source that now counts against its source's limits.
    Admitted,
    /// Drop it unanswered, for this reason (a `/metrics` label).
    Drop(&'static str),
    /// A new call over its source's limits.
    Refuse(Refusal),
}

/// A new call refused by its source's limits (see [`CallVerdict::Refuse`]).
#[derive(Debug, PartialEq)]
pub(super) struct Refusal {
    limit: guard::CallLimit,
    /// Seconds, for `Retry-After`.
    retry_after: u32,
    /// Answer with 503 (else drop: the source is past its answered refusals).
    answer: bool,
    log: LogVerdict,
}

/// Whether the request has `Require: 100rel` (RFC 3262).
pub(super) fn requires_100rel(req: &Request) -> bool {
    req.headers_named("Require")
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("100rel"))
}

impl Core {
    /// A request from `flow` (every request comes in here).
    pub(super) fn on_request(&mut self, req: Request, flow: Flow, now: Instant) {
        let key = ServerKey::of(&req);

        if req.method == Method::Ack {
            self.on_ack(&req, &key, now);
            return;
        }
        // A retransmission of a request we already have a transaction for.
        if let Some((id, entry)) = self.server.get_mut(&key) {
            let id = *id;
            let out = entry.tx.on_retransmission();
            debug!(call_id = %req.call_id, method = %req.method, "retransmission absorbed");
            self.apply_server(id, out, now);
            return;
        }
        if req.method == Method::Cancel {
            self.on_cancel(req, key, flow, now);
            return;
        }
        let in_dialog = req.to.tag().is_some_and(|tag| {
            self.by_local_tag
                .contains_key(&(req.call_id.clone(), tag.to_owned()))
        });
        let screened = self.acceptor.screen(&req, flow.remote.ip(), in_dialog, now);
        let counted = match screened {
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
            Screened::Refuse(refusal) => {
                self.refuse_call(&req, flow, refusal, now);
                return;
            }
        };
        if let Some((code, resp)) = self.refuse_extension_or_body(&req) {
            if let Some(ip) = counted {
                self.acceptor.calls.ended(ip);
            }
            self.new_server_and_respond(key, req, flow, None, (code, resp), now);
            return;
        }
        if req.method == Method::Register {
            self.on_register(req, key, flow, now);
            return;
        }
        if req.to.tag().is_some() {
            self.on_in_dialog(req, key, flow, now);
            return;
        }
        match req.method {
            Method::Invite => self.on_invite(req, key, flow, counted, now),
            Method::Options if self.stats.out_of_service.load(Ordering::Relaxed) => {
                // A load balancer's probe: take this node out of the set while it cannot
                // take calls (not ready, or draining).
                let resp = self
                    .response(&req, 503, "Service Unavailable", None)
                    .header("Retry-After", "5")
                    .header("Allow", self.allow())
                    .build();
                self.new_server_and_respond(key, req, flow, None, (503, resp), now);
            }
            Method::Options => {
                let resp = self
                    .response(&req, 200, "OK", None)
                    .header("Allow", self.allow())
                    .header("Accept", "application/sdp")
                    .header("Supported", "timer")
                    .build();
                self.new_server_and_respond(key, req, flow, None, (200, resp), now);
            }
            Method::Refer => {
                // Callers cannot make the city's server dial out: a REFER is taken only on a
                // call's own dialog, where the call decides.
                info!(remote = %flow.remote, "REFER outside a dialog refused");
                self.count_refusal("outside_dialog");
                let resp = self
                    .response(&req, 403, "Forbidden", None)
                    .header(
                        "Warning",
                        "399 ivr311 \"REFER is taken only inside a call\"",
                    )
                    .build();
                self.new_server_and_respond(key, req, flow, None, (403, resp), now);
            }
            Method::Bye | Method::Info | Method::Update | Method::Notify | Method::Prack => {
                // In-dialog methods without a To tag: there is no such dialog.
                let resp = self
                    .response(&req, 481, "Call/Transaction Does Not Exist", None)
                    .build();
                self.new_server_and_respond(key, req, flow, None, (481, resp), now);
            }
            Method::Other(_) => {
                let resp = self
                    .response(&req, 501, "Not Implemented", None)
                    .header("Allow", self.allow())
                    .build();
                self.new_server_and_respond(key, req, flow, None, (501, resp), now);
            }
            _ => {
                let resp = self
                    .response(&req, 405, "Method Not Allowed", None)
                    .header("Allow", self.allow())
                    .build();
                self.new_server_and_respond(key, req, flow, None, (405, resp), now);
            }
        }
    }

    /// Refuse a new call over its source's limits: a stateless 503 with Retry-After (when the
    /// source is within its bucket of answered refusals), counted, and logged once per source
    /// and window.
    fn refuse_call(&mut self, req: &Request, flow: Flow, refusal: Refusal, now: Instant) {
        let Refusal {
            limit,
            retry_after,
            answer,
            log,
        } = refusal;
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
                active = self.acceptor.calls.active(flow.remote.ip()),
                answered = answer,
                "new call refused: its source is over a per-source limit (503)"
            );
            if !self.acceptor.sweep_due {
                self.acceptor.sweep_due = true;
                self.arm(now + CALL_LOG_WINDOW, TimerRef::CallLogSweep);
            }
        }
        if answer {
            let resp = self
                .response(req, 503, "Service Unavailable", None)
                .header("Retry-After", retry_after.to_string())
                .build();
            self.transmit(flow, resp);
        }
    }

    /// Log the summaries of the call limiter's log windows that are over; sweep again later
    /// while any is open.
    pub(super) fn sweep_call_logs(&mut self, now: Instant) {
        self.acceptor.sweep_due = false;
        for sup in self.acceptor.calls.sweep(now) {
            log_calls_suppressed(&sup);
        }
        if self.acceptor.calls.has_log_windows() {
            self.acceptor.sweep_due = true;
            self.arm(now + CALL_LOG_WINDOW, TimerRef::CallLogSweep);
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
    /// on that call (no 180 while `answer_after_ms` rings; see [`Core::respond_invite`]), so
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

    /// ACK: of a non-2xx final (the INVITE's transaction absorbs it), or of our 2xx (it
    /// confirms the dialog's latest INVITE).
    fn on_ack(&mut self, req: &Request, key: &ServerKey, now: Instant) {
        // ACK for a non-2xx final: same branch as the INVITE.
        if let Some((id, e)) = self.server.get_mut(key) {
            let id = *id;
            let out = e.tx.on_ack(now);
            self.apply_server(id, out, now);
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
            self.apply_server(id, out, now);
        }
        if let Some(de) = self.dialogs.get_mut(&d) {
            de.ack_body = Bytes::new();
        }
    }

    pub(super) fn on_dialog_acked(&mut self, d: DialogId, now: Instant) {
        let (bye_pending, sdp) = match self.dialogs.get_mut(&d) {
            Some(de) => {
                de.dialog.state = DialogState::Confirmed { acked: true };
                (de.bye_pending, std::mem::take(&mut de.ack_body))
            }
            None => return,
        };
        self.dialog_event(d, DialogEvent::Confirmed { sdp });
        if bye_pending {
            self.send_bye(d, now);
        }
    }

    /// CANCEL of an INVITE we have not answered yet: 200 for the CANCEL, 487 for the INVITE,
    /// and the call hears [`DialogEvent::Cancelled`]; 481 when there is no such INVITE.
    fn on_cancel(&mut self, req: Request, key: ServerKey, flow: Flow, now: Instant) {
        let invite_key = key.invite();
        let found = self
            .server
            .get(&invite_key)
            .map(|(id, e)| (*id, e.tx.is_final(), e.dialog));
        let Some((invite_id, is_final, dialog)) = found else {
            let resp = self
                .response(&req, 481, "Call/Transaction Does Not Exist", None)
                .build();
            self.new_server_and_respond(key, req, flow, None, (481, resp), now);
            return;
        };
        let resp = self.response(&req, 200, "OK", None).build();
        self.new_server_and_respond(key, req, flow, None, (200, resp), now);
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
        self.apply_server(invite_id, resp, now);
        if let Some(d) = dialog {
            info!("caller cancelled before answer");
            self.dialog_event(d, DialogEvent::Cancelled);
            self.remove_dialog(d);
        }
    }

    /// A new call. `counted`: the source address it counts against in the per-source call
    /// limits, until its dialog is gone.
    fn on_invite(
        &mut self,
        req: Request,
        key: ServerKey,
        flow: Flow,
        counted: Option<IpAddr>,
        now: Instant,
    ) {
        // An agent's phone calling out (a consultation, 911, another line): it must prove it
        // is the agent it says it is, as its REGISTER did, before the call is routed by the
        // operators' dial plan rather than the menu.
        let auth = match self.agents.registrar.as_mut() {
            Some(r) => {
                let a = r.authorize_call(now, &req, flow);
                let locks = r.locks(now);
                *self.stats.locks.lock().unwrap_or_else(|e| e.into_inner()) = locks;
                a
            }
            None => CallAuth::NotAgent,
        };
        let agent = match auth {
            CallAuth::NotAgent => None,
            CallAuth::Agent(agent) => {
                info!(%agent, "call from an agent's phone");
                Some(agent)
            }
            CallAuth::Refuse(reply) => {
                if let Some(ip) = counted {
                    self.acceptor.calls.ended(ip);
                }
                let mut b = self.response(&req, reply.code, reply.reason, None);
                for (name, value) in &reply.headers {
                    b = b.header(name, value);
                }
                let resp = b.build();
                self.new_server_and_respond(key, req, flow, None, (reply.code, resp), now);
                return;
            }
        };
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
                tx: self.commands.clone(),
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
            agent,
        };
        let trying = ResponseBuilder::new(&req, 100, "Trying", None).build();
        let id = self.insert_server(key.clone(), req, flow, Some(d));
        self.by_local_tag
            .insert((dialog.call_id.clone(), local_tag), d);
        let mut entry =
            DialogEntry::new(dialog, EventSink::Call(EventQueue::new(ev_tx)), Some(key));
        entry.session = session;
        entry.counted = counted;
        self.insert_dialog(d, entry);
        let out = match self.server_entry(id) {
            Some(e) => e.tx.respond(now, 100, trying),
            None => return,
        };
        self.apply_server(id, out, now);
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
            );
        }
    }

    /// A request with a To tag: inside one of our dialogs, or 481.
    fn on_in_dialog(&mut self, req: Request, key: ServerKey, flow: Flow, now: Instant) {
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
            self.new_server_and_respond(key, req, flow, None, (481, resp), now);
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
            self.new_server_and_respond(key, req, flow, None, (500, resp), now);
            return;
        }
        match req.method.clone() {
            Method::Bye => {
                debug!(call_id = %req.call_id, "far end hung up");
                let resp = self.response(&req, 200, "OK", Some(&local_tag)).build();
                self.new_server_and_respond(key, req, flow, None, (200, resp), now);
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
                    self.new_server_and_respond(key, req, flow, None, (500, resp), now);
                    return;
                }
                if let Some(de) = self.dialogs.get_mut(&d) {
                    de.dialog.refresh_target(&req);
                }
                let (method, content_type, body) = (
                    req.method.clone(),
                    req.content_type().map(str::to_owned),
                    req.body.clone(),
                );
                let id = self.insert_server(key.clone(), req, flow, Some(d));
                if let Some(de) = self.dialogs.get_mut(&d) {
                    if de.dialog.state != DialogState::Early && key.method == Method::Invite {
                        de.last_invite = Some(key.clone());
                    }
                    de.reoffers.insert(id, key);
                }
                let ev = DialogEvent::Reoffer {
                    txn: id,
                    method,
                    content_type,
                    body,
                };
                self.dialog_event(d, ev);
            }
            Method::Refer => {
                let refer_to = crate::sip::refer::refer_to(req.headers_named("Refer-To"));
                let referred_by = req
                    .header("Referred-By")
                    .and_then(crate::sip::refer::referred_by);
                let replaces_dialog = refer_to
                    .as_ref()
                    .ok()
                    .and_then(|r| r.replaces.as_ref())
                    .and_then(|r| self.dialog_named(r));
                let cseq = req.cseq;
                let id = self.insert_server(key.clone(), req, flow, Some(d));
                if let Some(de) = self.dialogs.get_mut(&d) {
                    de.requests.insert(id, key);
                }
                let ev = DialogEvent::Refer(Box::new(Refer {
                    txn: id,
                    cseq,
                    refer_to,
                    referred_by,
                    replaces_dialog,
                }));
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
                self.new_server_and_respond(key, req, flow, Some(d), (200, resp), now);
                if let Some(ev) = ev {
                    self.dialog_event(d, ev);
                }
            }
            Method::Other(_) => {
                let resp = self
                    .response(&req, 501, "Not Implemented", Some(&local_tag))
                    .header("Allow", self.allow())
                    .build();
                self.new_server_and_respond(key, req, flow, None, (501, resp), now);
            }
            _ => {
                let resp = self
                    .response(&req, 405, "Method Not Allowed", Some(&local_tag))
                    .header("Allow", self.allow())
                    .build();
                self.new_server_and_respond(key, req, flow, None, (405, resp), now);
            }
        }
    }

    /// The call's response to its INVITE (18x, 2xx with SDP, or a failure).
    pub(super) fn respond_invite(
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
        self.apply_server(id, out, now);
    }

    /// The dialog a `Replaces` names (RFC 3891 §3): its Call-ID, our tag and the far end's.
    /// Phones differ on which tag they call "to" when the dialog is one they placed to us and
    /// one we placed to them, so either order matches.
    fn dialog_named(&self, r: &crate::sip::refer::Replaces) -> Option<DialogId> {
        [(&r.to_tag, &r.from_tag), (&r.from_tag, &r.to_tag)]
            .into_iter()
            .find_map(|(ours, theirs)| {
                let d = *self.by_local_tag.get(&(r.call_id.clone(), ours.clone()))?;
                let de = self.dialogs.get(&d)?;
                (de.dialog.remote_tag == *theirs).then_some(d)
            })
    }

    /// Count a transfer request refused here (`ivr311_transfer_refusals_total{reason}`).
    pub(super) fn count_refusal(&self, reason: &str) {
        if let Some(m) = &self.metrics {
            m.add(
                "ivr311_transfer_refusals_total",
                "Transfer requests (REFER, an agent's call, the admin API) refused, by reason.",
                &[("reason", reason)],
                1,
            );
        }
    }

    /// The call's answer to a request it was asked to answer (REFER): `code` with its usual
    /// reason phrase and `headers`.
    pub(super) fn answer_request(
        &mut self,
        dialog: DialogId,
        txn: u64,
        code: u16,
        headers: Vec<(String, String)>,
        now: Instant,
    ) {
        let Some(key) = self
            .dialogs
            .get_mut(&dialog)
            .and_then(|de| de.requests.remove(&txn))
        else {
            return;
        };
        let local_tag = self
            .dialogs
            .get(&dialog)
            .map(|de| de.dialog.local_tag.clone())
            .unwrap_or_default();
        let ua = self.user_agent.clone();
        let Some((id, e)) = self.server.get_mut(&key) else {
            return;
        };
        let id = *id;
        let Some(request) = e.request.as_deref() else {
            return;
        };
        let mut b = ResponseBuilder::new(
            request,
            code,
            crate::sip::refer::reason_phrase(code),
            Some(&local_tag),
        )
        .header("Server", ua);
        for (k, v) in headers {
            b = b.header(&k, v);
        }
        let out = e.tx.respond(now, code, b.build());
        self.apply_server(id, out, now);
    }

    /// The call's answer to re-INVITE/UPDATE `txn` of `dialog`.
    pub(super) fn answer_reoffer(
        &mut self,
        dialog: DialogId,
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
        now: Instant,
    ) {
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
            Some(asked) if code < 300 => self.refresh_session(dialog, asked, body.as_ref(), now),
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
        let mut b =
            ResponseBuilder::new(request, code, reason, Some(&local_tag)).header("Server", ua);
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
        self.apply_server(id, out, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse_datagram, Message};

    fn request(method: &str, user_agent: &str, to_tag: &str) -> Request {
        let text = format!(
            "{method} sip:311@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bK1\r\n\
From: <sip:caller@198.51.100.7>;tag=f\r\nTo: <sip:311@192.0.2.1>{to_tag}\r\nCall-ID: c\r\n\
CSeq: 1 {method}\r\nUser-Agent: {user_agent}\r\nContent-Length: 0\r\n\r\n"
        );
        match parse_datagram(text.as_bytes(), 65535) {
            Ok(Message::Request(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn screening_drops_scanners_strangers_and_floods_and_counts_untrusted_calls_only() {
        let now = Instant::now();
        let trunk: IpAddr = "203.0.113.5".parse().unwrap();
        let phone: IpAddr = "198.51.100.7".parse().unwrap();
        let mut a = Acceptor::new(Screening {
            per_second: 1,
            burst: 2,
            max_calls_per_source: 1,
            invites_per_second: 100,
            invites_burst: 100,
            ..Screening::default()
        });
        let invite = request("INVITE", "Zoiper", "");
        assert_eq!(a.screen(&invite, phone, false, now), Screened::Admitted);
        assert!(matches!(
            a.screen(&invite, phone, false, now),
            Screened::Refuse(Refusal { answer: true, .. })
        ));
        // A known scanner outside a dialog: dropped unanswered; inside one of ours it passes.
        let scan = request("OPTIONS", "friendly-scanner", "");
        assert_eq!(
            a.screen(&scan, phone, false, now),
            Screened::Drop("scanner")
        );
        let bye = request("BYE", "friendly-scanner", ";tag=ours");
        assert_eq!(a.screen(&bye, phone, true, now), Screened::Pass);
        // Out-of-dialog requests other than INVITE: a burst, then the rate.
        let options = request("OPTIONS", "monitor", "");
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        assert_eq!(a.screen(&options, other, false, now), Screened::Pass);
        assert_eq!(a.screen(&options, other, false, now), Screened::Pass);
        assert_eq!(
            a.screen(&options, other, false, now),
            Screened::Drop("rate_limited")
        );
        // With an allow-list: INVITEs from elsewhere are dropped, a listed trunk's calls are
        // not counted against any limit.
        let mut a = Acceptor::new(Screening {
            trunks_allow: vec!["203.0.113.0/24".parse().unwrap()],
            max_calls_per_source: 1,
            per_second: 1,
            burst: 2,
            ..Screening::default()
        });
        assert_eq!(
            a.screen(&invite, phone, false, now),
            Screened::Drop("source_not_allowed")
        );
        for _ in 0..3 {
            assert_eq!(a.screen(&invite, trunk, false, now), Screened::Pass);
        }
        // Nor are its other requests: an edge proxy relays everyone's REGISTERs and probes.
        for _ in 0..100 {
            assert_eq!(a.screen(&options, trunk, false, now), Screened::Pass);
        }
        for _ in 0..2 {
            assert_eq!(a.screen(&options, phone, false, now), Screened::Pass);
        }
        assert_eq!(
            a.screen(&options, phone, false, now),
            Screened::Drop("rate_limited")
        );
    }
}
