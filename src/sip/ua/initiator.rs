//! Outbound calls (UAC legs): INVITE, digest retry, CANCEL and 2xx races, forks.

use super::*;

/// The parts of an INVITE we sent that its CANCEL (§9.1) and the ACK of a non-2xx final
/// (§17.1.1.3) repeat: Request-URI, Via branch, From, Call-ID, CSeq number, Route.
#[derive(Debug, Clone)]
pub(super) struct SentInvite {
    pub(super) uri: String,
    pub(super) branch: String,
    pub(super) transport: Transport,
    pub(super) local: SocketAddr,
    /// The whole From value, with our tag.
    pub(super) from: String,
    /// The INVITE's To (no tag for an initial INVITE).
    pub(super) to: String,
    pub(super) call_id: String,
    pub(super) cseq: u32,
    pub(super) routes: Vec<String>,
    /// Our From URI and tag, for the UAC dialog a 2xx creates.
    pub(super) local_uri: String,
    pub(super) local_tag: String,
}

impl SentInvite {
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
    pub(super) invite: ClientKey,
    /// What a digest challenge to the INVITE is answered with, once (trunk legs only).
    pub(super) auth: Option<Box<AuthRetry>>,
    pub(super) state: LegState,
    /// After a CANCEL: when to stop waiting for the INVITE's final response (64·T1, §9.1).
    pub(super) cancel_deadline: Option<Instant>,
}

/// How to send an outbound INVITE again with credentials.
#[derive(Debug)]
pub(super) struct AuthRetry {
    pub(super) creds: TrunkCredentials,
    pub(super) flow: Flow,
    pub(super) headers: Vec<(String, String)>,
    pub(super) sdp: Bytes,
    /// Credentials went once already: only a `stale=true` challenge (the nonce expired in
    /// between, RFC 7616 §3.3) is answered again, once.
    pub(super) answered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LegState {
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
    pub(super) fn cancelled(self) -> bool {
        matches!(self, LegState::CancelPending | LegState::Cancelling)
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
pub(super) fn clean_uri(uri: &str) -> bool {
    !uri.chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"'))
}

/// Check an outbound target sent along a given flow ([`OutboundHandle::invite_via`]): a `sip:`
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
pub(super) fn escape_user(user: &str) -> String {
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
pub(super) const OWN_HEADERS: &[&str] = &[
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
pub(super) fn extra_header(name: &str, value: &str) -> Option<(String, String)> {
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

impl UaCore {
    pub(super) async fn start_outbound(&mut self, inv: InviteCommand, now: Instant) {
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
    pub(super) async fn start_invite_transaction(
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
    pub(super) fn invite_bytes(
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
    pub(super) async fn retry_with_auth(
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
    pub(super) async fn cancel_leg(&mut self, d: DialogId, now: Instant) {
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

    pub(super) async fn send_cancel(&mut self, d: DialogId, now: Instant) {
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
    pub(super) fn leg_event(&mut self, d: DialogId, ev: LegEvent) {
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
    pub(super) async fn on_outbound_response(
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
    pub(super) async fn on_outbound_2xx(
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

    pub(super) fn dialog_answered(&mut self, d: DialogId, sdp: Bytes) {
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

    /// Outbound leg `leg` is over with `last` (its failure): its owner hears it after what is
    /// queued.
    pub(super) fn finish_leg(&self, leg: OutboundLeg, last: LegEvent) {
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

    /// 64·T1 after our CANCEL and still no final response for the INVITE: give up (§9.1).
    pub(super) fn on_cancel_deadline(&mut self, d: DialogId, now: Instant) {
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
