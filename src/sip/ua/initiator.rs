//! Outbound calls (UAC legs): the INVITE, a digest challenge answered once, CANCEL and the
//! 2xx that crosses it, forks, and the end of a leg that never got a final response.
//!
//! Owns the legs not answered yet ([`Initiator`]: each an [`OutboundLeg`] with its
//! [`LegState`]) and the checks of what a call may send to (target URIs, flows, From user
//! parts, extra headers). Once a 2xx arrives the leg is a dialog like any other (its requests
//! and BYE are [`super::core`]'s); a leg never touches an inbound call. Sans-IO: what is sent
//! is queued, the timer after a CANCEL is on the core's table. Host names and TCP connections
//! are not looked up or opened here but by [`super::OutboundHandle`], in the caller's task.

use super::core::{ClientEntry, ClientKey, ClientKind, Core, DialogEntry, TimerRef};
use super::events::{EventQueue, EventSink, LegEvent};
use super::handle::InviteCommand;
use super::DialogId;
use crate::sip::dialog::{contact_uri, Dialog, DialogState};
use crate::sip::message::{
    new_branch, random_token, sanitize_quoted, uri_socket_addr, uri_transport, Method,
    RequestBuilder, Response,
};
use crate::sip::registrar::TrunkCredentials;
use crate::sip::transaction::{ClientTransaction, T1};
use crate::sip::transport::{Flow, Transport};
use bytes::Bytes;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Instant;
use tracing::{debug, info, warn};

/// The initiator's own state.
#[derive(Default)]
pub(super) struct Initiator {
    /// Outbound calls not answered (nor failed) yet.
    pub(super) legs: HashMap<DialogId, OutboundLeg>,
    /// What an outbound INVITE to a trunk answers a 401/407 with
    /// ([`super::UaCore::with_trunk_auth`]).
    pub(super) auth: TrunkCredentials,
}

/// The parts of an INVITE we sent that its CANCEL (§9.1) and the ACK of a non-2xx final
/// (§17.1.1.3) repeat: Request-URI, Via branch, From, Call-ID, CSeq number, Route.
#[derive(Debug, Clone)]
pub(super) struct SentInvite {
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
    /// A re-INVITE we send in `dialog` with Via branch `branch`, from `local`.
    pub(super) fn in_dialog(dialog: &Dialog, branch: &str, local: SocketAddr) -> Self {
        SentInvite {
            uri: dialog.remote_target.clone(),
            branch: branch.to_owned(),
            transport: dialog.flow.transport,
            local,
            from: format!("<{}>;tag={}", dialog.local_uri, dialog.local_tag),
            to: dialog.remote_from.clone(),
            call_id: dialog.call_id.clone(),
            cseq: dialog.local_cseq,
            routes: dialog.route_set.clone(),
            local_uri: dialog.local_uri.clone(),
            local_tag: dialog.local_tag.clone(),
        }
    }

    /// CANCEL (with the INVITE's To) or the ACK of a non-2xx final (with the response's To).
    pub(super) fn build(&self, method: &Method, to: &str) -> Bytes {
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
pub(super) struct OutboundLeg {
    pub(super) events: EventQueue<LegEvent>,
    /// The INVITE client transaction.
    invite: ClientKey,
    /// What a digest challenge to the INVITE is answered with, once (trunk legs only).
    auth: Option<Box<AuthRetry>>,
    pub(super) state: LegState,
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

/// Where an outbound leg stands before its final response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LegState {
    /// INVITE sent, no response yet.
    Calling,
    /// A provisional response arrived.
    Proceeding,
    /// Cancelled before any provisional response: the CANCEL goes out with the first one.
    CancelPending,
    /// CANCEL sent; waiting for the INVITE's final response until `until` (64·T1, §9.1).
    Cancelling { until: Instant },
}

impl LegState {
    pub(super) fn cancelled(self) -> bool {
        matches!(self, LegState::CancelPending | LegState::Cancelling { .. })
    }
}

/// Check an outbound target (a `sip:` URI, over UDP, or TCP where `tcp` allows it, that our
/// socket bound to `bound` can reach) and say where it goes: its IP literal, or `resolved`,
/// what its host name was looked up to.
pub(super) fn outbound_target(
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

/// No characters that would break out of a Request-URI or a `<...>`.
fn clean_uri(uri: &str) -> bool {
    !uri.chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"'))
}

/// Check an outbound target sent along a given flow ([`super::OutboundHandle::invite_via`]): a `sip:`
/// or `sips:` URI, and a flow our sockets can use.
pub(super) fn via_flow(target: &str, flow: Flow, bound: SocketAddr) -> Result<Flow, &'static str> {
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

impl Core {
    /// Start an outbound call: check where it goes, send its INVITE. A target or flow that
    /// cannot be used fails the leg at once with 503.
    pub(super) fn start_outbound(&mut self, inv: InviteCommand, now: Instant) {
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
        let bound = self.bound;
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
        let auth = (via.is_none() && !self.initiator.auth.is_empty()).then(|| {
            Box::new(AuthRetry {
                creds: self.initiator.auth.clone(),
                flow,
                headers,
                sdp,
                answered: false,
            })
        });
        self.initiator.legs.insert(
            d,
            OutboundLeg {
                events: EventQueue::new(events),
                invite: key.clone(),
                auth,
                state: LegState::Calling,
            },
        );
        self.start_invite_transaction(key, d, sent, (flow, bytes), now);
    }

    /// Start the INVITE client transaction `key` of outbound leg `d` (whose `invite` already
    /// names it).
    fn start_invite_transaction(
        &mut self,
        key: ClientKey,
        d: DialogId,
        sent: SentInvite,
        (flow, bytes): (Flow, Bytes),
        now: Instant,
    ) {
        let (tx, out) = ClientTransaction::new(now, true, flow.transport.is_reliable(), bytes);
        let mut entry = ClientEntry::new(
            tx,
            flow,
            ClientKind::OutboundInvite,
            Method::Invite,
            Some(d),
        );
        entry.invite = Some(sent);
        self.start_client(key, entry, out);
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
    fn retry_with_auth(
        &mut self,
        key: &ClientKey,
        d: DialogId,
        resp: &Response,
        now: Instant,
    ) -> bool {
        let Some(leg) = self.initiator.legs.get_mut(&d) else {
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
        if let Some(leg) = self.initiator.legs.get_mut(&d) {
            leg.invite = new_key.clone();
            leg.state = LegState::Calling;
            leg.auth = again;
        }
        self.start_invite_transaction(new_key, d, sent, (flow, bytes), now);
        true
    }

    /// Hang up an outbound leg that has not been answered: CANCEL once it is allowed (§9.1).
    pub(super) fn cancel_leg(&mut self, d: DialogId, now: Instant) {
        let Some(leg) = self.initiator.legs.get_mut(&d) else {
            return;
        };
        match leg.state {
            LegState::Calling => {
                debug!("CANCEL held until a provisional response arrives");
                leg.state = LegState::CancelPending;
            }
            LegState::Proceeding => self.send_cancel(d, now),
            LegState::CancelPending | LegState::Cancelling { .. } => {}
        }
    }

    /// CANCEL leg `d`'s INVITE (with its branch, §9.1), and give up on a final response to it
    /// after 64·T1.
    fn send_cancel(&mut self, d: DialogId, now: Instant) {
        let Some(leg) = self.initiator.legs.get_mut(&d) else {
            return;
        };
        if matches!(leg.state, LegState::Cancelling { .. }) {
            return;
        }
        let deadline = now + 64 * T1;
        leg.state = LegState::Cancelling { until: deadline };
        let invite = leg.invite.clone();
        self.arm(deadline, TimerRef::Leg(d));
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
        let entry = ClientEntry::new(tx, flow, ClientKind::Cancel, Method::Cancel, Some(d));
        self.start_client(key, entry, out);
    }

    /// Hand `ev` to outbound leg `d`'s owner (not answered yet), now or in order later.
    fn leg_event(&mut self, d: DialogId, ev: LegEvent) {
        let Some(leg) = self.initiator.legs.get_mut(&d) else {
            return;
        };
        let queued = leg.events.push(ev);
        let listener = Some(leg.events.listener());
        self.queued(
            d,
            queued,
            listener,
            "outbound call not listening; event dropped",
        );
    }

    /// A response to an outbound INVITE, as its transaction passed it up.
    pub(super) fn on_outbound_response(
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
                let Some(leg) = self.initiator.legs.get_mut(&d) else {
                    return;
                };
                match leg.state {
                    LegState::Calling if leg.events.tx.is_closed() => {
                        // Nobody wants this call any more.
                        self.send_cancel(d, now)
                    }
                    LegState::Calling => leg.state = LegState::Proceeding,
                    LegState::CancelPending => self.send_cancel(d, now),
                    LegState::Proceeding | LegState::Cancelling { .. } => {}
                }
            }
            200..=299 => self.on_outbound_2xx(key, d, resp, now),
            401 | 407 if self.retry_with_auth(key, d, resp, now) => {}
            _ => {
                let Some(leg) = self.initiator.legs.remove(&d) else {
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
    fn on_outbound_2xx(&mut self, key: &ClientKey, d: DialogId, resp: &Response, now: Instant) {
        let tag = resp.to.tag().unwrap_or_default().to_owned();
        let Some((_, e)) = self.client.get(key) else {
            return;
        };
        let flow = e.flow;
        if let Some(ack) = e.acks.get(&tag).cloned() {
            debug!("2xx retransmitted; ACK sent again");
            self.transmit(flow, ack);
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
        self.transmit(flow, ack.clone());
        if let Some((_, e)) = self.client.get_mut(key) {
            e.acks.insert(tag, ack);
        }
        let leg = self.initiator.legs.remove(&d);
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
        self.insert_dialog(id, DialogEntry::new(dialog, events, None));
        if wanted {
            info!(call_id = %sent.call_id, "outbound call answered");
            self.dialog_answered(id, body);
        } else {
            self.send_bye(id, now);
        }
    }

    /// Leg `d`'s owner hears that it was answered (its dialog now hears the rest).
    fn dialog_answered(&mut self, d: DialogId, sdp: Bytes) {
        let Some(DialogEntry {
            events: EventSink::Leg(q),
            ..
        }) = self.dialogs.get_mut(&d)
        else {
            return;
        };
        let queued = q.push(LegEvent::Answered { sdp });
        let listener = Some(q.listener());
        self.queued(
            d,
            queued,
            listener,
            "outbound call not listening; answer dropped",
        );
    }

    /// Outbound leg `leg` is over with `last` (its failure): its owner hears it after what is
    /// queued.
    pub(super) fn finish_leg(&mut self, leg: OutboundLeg, last: LegEvent) {
        let mut q = leg.events;
        q.push_last(last);
        self.drain_later(q.into_backlog());
    }

    /// 64·T1 after our CANCEL and still no final response for the INVITE: give up (§9.1).
    pub(super) fn on_cancel_deadline(&mut self, d: DialogId, now: Instant) {
        let due =
            self.initiator.legs.get(&d).is_some_and(
                |leg| matches!(leg.state, LegState::Cancelling { until } if until <= now),
            );
        if !due {
            return;
        }
        let Some(leg) = self.initiator.legs.remove(&d) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::wants_tcp;

    #[test]
    fn a_target_asks_for_tcp_with_its_transport_parameter_only() {
        assert!(wants_tcp("sip:911@192.0.2.1;transport=tcp"));
        assert!(wants_tcp("sip:911@psap.example.gov:5060;Transport=TCP;lr"));
        assert!(!wants_tcp("sip:911@192.0.2.1;transport=tcpx"));
        assert!(!wants_tcp("sip:911@192.0.2.1;transport=udp"));
        assert!(!wants_tcp("sip:tcp@192.0.2.1"));
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

    #[test]
    fn targets_are_sip_uris_our_socket_can_reach() {
        let v4: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        assert_eq!(
            outbound_target("sip:911@192.0.2.9:5080", v4, None, false),
            Ok("192.0.2.9:5080".parse().unwrap())
        );
        assert_eq!(
            outbound_target("sip:911@192.0.2.9", v4, None, false),
            Ok("192.0.2.9:5060".parse().unwrap()),
            "no port: 5060"
        );
        let looked_up: SocketAddr = "198.51.100.7:5060".parse().unwrap();
        assert_eq!(
            outbound_target("sip:911@psap.example.gov", v4, Some(looked_up), false),
            Ok(looked_up)
        );
        assert!(outbound_target("sip:911@psap.example.gov", v4, None, false).is_err());
        assert!(outbound_target("sip:911@192.0.2.9;transport=tcp", v4, None, false).is_err());
        assert!(outbound_target("sip:911@192.0.2.9;transport=tcp", v4, None, true).is_ok());
        assert!(outbound_target("sip:911@[2001:db8::1]", v4, None, false).is_err());
        assert!(outbound_target("sip:911@192.0.2.9:0", v4, None, false).is_err());
        assert!(outbound_target("sips:911@192.0.2.9", v4, None, false).is_err());
    }
}
