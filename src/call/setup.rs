//! Accepting a call: who is calling (the trust model), the limits, SDP offer/answer, an RTP
//! port, 180 and 200. This is IO glue, async by nature (it waits for the ringing time and for
//! a delayed offer's ACK); once the call is answered it is handed to the driver.

use super::driver::{now, run_call, CallContext};
use super::registry::CallInfo;
use super::SUPPORTED_CODECS;
use crate::media::ports::RtpPort;
use crate::media::rtp::LatchScope;
use crate::media::sdp::{self, Negotiated};
use crate::media::session::MediaSession;
use crate::sip::ua::{AppEvent, DialogEvent, IncomingCall};
use bytes::Bytes;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

/// Who is calling and what they dialled, for the application.
#[derive(Debug, Clone)]
pub struct CallMeta {
    pub call_id: String,
    /// The caller's number as best known (asserted, else claimed: see [`CallerIdentity`]),
    /// for tickets, the audit and the operator's phone.
    pub caller: String,
    /// Whether anyone vouches for `caller`.
    pub identity: CallerIdentity,
    /// The number dialled, e.g. `311`: the one that chose the line (see
    /// [`super::lines`]), else the Request-URI user.
    pub dialled: String,
    /// The line answered: its number as configured, or [`super::DEFAULT_LINE`].
    pub line: String,
    /// The server's wall clock when the call was answered: the menu's schedules are read
    /// from it.
    pub answered_at: jiff::Timestamp,
}

/// Take new calls from the UA core until it closes.
pub async fn accept_calls(
    mut app_rx: mpsc::Receiver<AppEvent>,
    ctx: CallContext,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let config = Arc::new(ctx.core_config());
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = app_rx.recv() => match ev { Some(ev) => ev, None => return },
        };
        match ev {
            // An agent's phone calling out (authenticated by the UA core): the operators'
            // dial plan, never the menu.
            AppEvent::Invite(call) if call.agent.is_some() => {
                let agent = call.agent.clone().unwrap_or_default();
                super::consult::spawn(call, agent, ctx.clone(), &tracker, cancel.clone());
            }
            AppEvent::Invite(mut call) => {
                // RFC 3325: P-Asserted-Identity only from inside the trust domain; from anyone
                // else it is removed, so nothing further on can mistake it for verified.
                let identity = identify(&mut call, &ctx.trusted);
                let shown = ctx.log.number(identity.number());
                let span = info_span!("call", call_id = %call.call_id, caller = %shown, verified = identity.is_verified());
                let (ctx, config, cancel) = (ctx.clone(), config.clone(), cancel.clone());
                // Each call sets itself up in its own task, so a slow answer (ringing) never
                // holds up the next caller.
                tracker.spawn(
                    async move {
                        if let Some(setup) = setup_call(&ctx, call, identity).await {
                            run_call(setup, ctx, config, cancel).await;
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// Who a caller is, as far as the server can tell (RFC 3325's trust model).
///
/// A number is *asserted* when it arrives in `P-Asserted-Identity` from a source in
/// `trunks.allow`: the carrier, which authenticated the line, vouches for it. Everything else
/// is *claimed*: `From` is written by the caller's own equipment, and so is a
/// `P-Asserted-Identity` from anywhere outside the trust domain. Only an asserted number is
/// called back ([`CallbackConfig::callback_number`](crate::config::CallbackConfig)) and
/// asserted to 911 (see the 911 redirect in `call::emergency`); a claimed one is still shown to operators and
/// kept on tickets, marked as what it is in the 911 audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerIdentity {
    /// From `P-Asserted-Identity`, sent by a trusted trunk.
    Asserted(String),
    /// From `From` (or `anonymous` when it has no user part): unverified.
    Claimed(String),
}

impl CallerIdentity {
    /// The number (or user), asserted or not.
    pub fn number(&self) -> &str {
        match self {
            CallerIdentity::Asserted(n) | CallerIdentity::Claimed(n) => n,
        }
    }

    /// The number, if a trusted trunk asserted it.
    pub fn asserted(&self) -> Option<&str> {
        match self {
            CallerIdentity::Asserted(n) => Some(n),
            CallerIdentity::Claimed(_) => None,
        }
    }

    pub fn is_verified(&self) -> bool {
        matches!(self, CallerIdentity::Asserted(_))
    }
}

/// Whether `ip` is inside the trust domain: in `trunks.allow`. An empty list (INVITEs taken
/// from anywhere) trusts nobody.
pub fn trusted_source(trusted: &[crate::sip::guard::IpNet], ip: IpAddr) -> bool {
    trusted.iter().any(|n| n.contains(ip))
}

/// Who is calling: `P-Asserted-Identity` when the INVITE came from a trusted source
/// ([`trusted_source`]), else `From`. An untrusted INVITE's `P-Asserted-Identity` headers are
/// removed from `call`.
pub fn identify(call: &mut IncomingCall, trusted: &[crate::sip::guard::IpNet]) -> CallerIdentity {
    let is_pai =
        |h: &crate::sip::message::Header| h.name.eq_ignore_ascii_case("P-Asserted-Identity");
    if trusted_source(trusted, call.source.ip()) {
        let asserted = call
            .headers
            .iter()
            .find(|h| is_pai(h))
            .and_then(|h| crate::sip::message::NameAddr::parse(&h.value).ok())
            .and_then(|n| n.user().map(str::to_owned));
        if let Some(n) = asserted {
            return CallerIdentity::Asserted(n);
        }
    } else if call.headers.iter().any(is_pai) {
        debug!(source = %call.source, "P-Asserted-Identity from an untrusted source removed");
        call.headers.retain(|h| !is_pai(h));
    }
    CallerIdentity::Claimed(
        call.from
            .user()
            .map_or_else(|| "anonymous".to_owned(), str::to_owned),
    )
}

pub(crate) struct CallSetup {
    pub(crate) call: IncomingCall,
    pub(crate) meta: CallMeta,
    pub(crate) port: RtpPort,
    pub(crate) media: MediaSession,
    pub(crate) local_media: SocketAddr,
    pub(crate) session_id: u64,
    pub(crate) registry_id: u64,
    /// When the INVITE arrived.
    pub(crate) arrived: std::time::Instant,
    /// The menu of the line dialled.
    pub(crate) menu: Arc<super::ActiveMenu>,
}

/// Refuse the call with `code`, and keep why in the call history.
async fn reject(
    (ctx, identity, arrived): (&CallContext, &CallerIdentity, std::time::Instant),
    call: &IncomingCall,
    (code, reason): (u16, &str),
    why: &str,
    headers: Vec<(String, String)>,
) {
    call.handle.respond(code, reason, headers, None).await;
    let dialled = crate::sip::message::uri_user(&call.request_uri).unwrap_or_default();
    let row = super::facts::unanswered(
        arrived,
        now(),
        &call.call_id,
        identity,
        dialled,
        Some((code, why)),
    );
    ctx.history
        .record(crate::history::Record::Call(Box::new(row)));
}

/// Limits, SDP offer/answer, RTP port, 200 OK.
async fn setup_call(
    ctx: &CallContext,
    call: IncomingCall,
    identity: CallerIdentity,
) -> Option<CallSetup> {
    let retry = || vec![("Retry-After".to_owned(), "30".to_owned())];
    let arrived = now();
    let who = (ctx, &identity, arrived);
    const UNAVAILABLE: (u16, &str) = (503, "Service Unavailable");
    if ctx.draining.is_cancelled() {
        info!("shutting down; call refused");
        ctx.registry.rejected.fetch_add(1, Ordering::Relaxed);
        reject(who, &call, UNAVAILABLE, "draining", retry()).await;
        return None;
    }
    if ctx.registry.len() >= ctx.limits.max_calls {
        warn!(max_calls = ctx.limits.max_calls, "call limit reached; 503");
        ctx.registry.rejected.fetch_add(1, Ordering::Relaxed);
        reject(who, &call, UNAVAILABLE, "max_calls", retry()).await;
        return None;
    }
    // An INVITE without a body is a delayed offer (RFC 3261 §13.2.1): many trunks and PBXs
    // send one (Cisco CUCM's SIP trunks by default). We offer in the 200 and the ACK answers.
    // (The UA already refused a body that is not SDP with 415.)
    let delayed = call.body.is_empty();
    let negotiated = if delayed {
        Ok(None)
    } else {
        sdp::parse(&call.body).and_then(|offer| {
            let neg = sdp::negotiate(&offer, &SUPPORTED_CODECS)?;
            Ok(Some((offer, neg)))
        })
    };
    let offered = match negotiated {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "offer refused; 488");
            ctx.registry.rejected.fetch_add(1, Ordering::Relaxed);
            let w = vec![(
                "Warning".into(),
                format!(
                    "305 ivr311 \"{}\"",
                    crate::sip::message::sanitize_quoted(&e.to_string())
                ),
            )];
            let why = "no common codec";
            reject(who, &call, (488, "Not Acceptable Here"), why, w).await;
            return None;
        }
    };
    let mut call = call;
    if ctx.answer_after > Duration::ZERO {
        // Ring before answering, as a PBX does; the caller may give up meanwhile.
        call.handle.respond(180, "Ringing", vec![], None).await;
        let sleep = tokio::time::sleep(ctx.answer_after);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                ev = call.events.recv() => match ev {
                    Some(DialogEvent::Cancelled) | None => {
                        info!("caller gave up while ringing");
                        let dialled = crate::sip::message::uri_user(&call.request_uri)
                            .unwrap_or_default();
                        let row = super::facts::unanswered(
                            arrived,
                            now(),
                            &call.call_id,
                            &identity,
                            dialled,
                            None,
                        );
                        ctx.history
                            .record(crate::history::Record::Call(Box::new(row)));
                        return None;
                    }
                    Some(_) => {}
                },
            }
        }
    }
    let Some(port) = ctx.ports.allocate() else {
        warn!("no RTP port free; 503");
        ctx.registry.rejected.fetch_add(1, Ordering::Relaxed);
        reject(who, &call, UNAVAILABLE, "no RTP port", retry()).await;
        return None;
    };
    let ip = ctx
        .advertise_ip
        .or_else(|| {
            let bound = port.socket.local_addr().ok()?.ip();
            (!bound.is_unspecified()).then_some(bound)
        })
        .or_else(|| {
            let towards = offered
                .as_ref()
                .map_or(call.source.ip(), |(o, _)| o.addr.ip());
            crate::sip::transport::local_ip_towards(towards)
        })
        .unwrap_or(call.local.ip());
    let local_media = SocketAddr::new(ip, port.port);
    let session_id: u64 = rand::random::<u32>() as u64;
    let body = match &offered {
        // The offer parsed a moment ago; building our answer from it cannot fail in
        // practice, but if it does, fall back to a single audio line.
        Some((_, neg)) => sdp::build_answer_for_offer(&call.body, local_media, session_id, 1, neg)
            .unwrap_or_else(|_| sdp::build_answer(local_media, session_id, 1, neg)),
        None => sdp::build_offer(
            local_media,
            session_id,
            1,
            &SUPPORTED_CODECS,
            Some(TELEPHONE_EVENT_PT),
            sdp::Direction::SendRecv,
        ),
    };
    let registry_id = ctx.registry.insert(CallInfo {
        call_id: call.call_id.clone(),
        caller: identity.number().to_owned(),
        started: now(),
        rtp_port: port.port,
        language: ctx.default_language.clone(),
        state: "answering".into(),
        hangup: CancellationToken::new(),
    });
    match &offered {
        Some((offer, neg)) => {
            info!(codec = ?neg.codec, rtp_port = port.port, remote_media = %offer.addr, "answering")
        }
        None => info!(rtp_port = port.port, "answering a delayed offer with ours"),
    }
    call.handle
        .respond(
            200,
            "OK",
            vec![],
            Some(("application/sdp".into(), Bytes::from(body))),
        )
        .await;
    // The caller's media is taken from its SDP's address or from where its INVITE came from
    // (behind NAT), nowhere else.
    let scope = LatchScope::SdpOr(call.source.ip());
    let media = match offered {
        // Nothing is sent to the offer's address until the ACK (or the caller's own media)
        // shows the caller is there: see `MediaSession::until_confirmed`.
        Some((offer, neg)) => MediaSession::new(now(), neg, offer.addr)
            .latch_scope(scope)
            .until_confirmed(),
        // A delayed offer: the ACK carries the answer, so the call is confirmed already.
        None => match ack_answer(&mut call).await {
            Some((neg, remote)) => MediaSession::new(now(), neg, remote).latch_scope(scope),
            None => {
                ctx.registry.remove(registry_id);
                return None;
            }
        },
    };
    let called = super::lines::called_numbers(
        &call.request_uri,
        call.to.user(),
        &call.headers,
        trusted_source(&ctx.trusted, call.source.ip()),
    );
    let choice = ctx.menu.for_call(&called);
    let dialled = match &choice.dialled {
        Some((from, number)) => {
            info!(line = %choice.line, called_from = from.as_str(), "line chosen by the dialled number");
            number.clone()
        }
        None => {
            debug!(line = %choice.line, "no line's number dialled; the default line");
            crate::sip::message::uri_user(&call.request_uri)
                .unwrap_or_default()
                .to_owned()
        }
    };
    let meta = CallMeta {
        call_id: call.call_id.clone(),
        caller: identity.number().to_owned(),
        identity,
        dialled,
        line: choice.line,
        answered_at: ctx.wall_clock.now(),
    };
    Some(CallSetup {
        call,
        meta,
        port,
        media,
        local_media,
        session_id,
        registry_id,
        arrived,
        menu: choice.menu,
    })
}

/// The payload type we offer telephone-event (RFC 4733) at.
const TELEPHONE_EVENT_PT: u8 = 101;

/// After our 200 made the offer (a delayed-offer INVITE): wait for the ACK and read its
/// answer. `None` when the call ends instead (hung up, no ACK) or the answer is missing or
/// unusable; RFC 3261 §13.3.1.4 then has us end the call with BYE, as sent here.
async fn ack_answer(call: &mut IncomingCall) -> Option<(Negotiated, SocketAddr)> {
    loop {
        match call.events.recv().await? {
            DialogEvent::Confirmed { sdp } => {
                return match super::leg::leg_answer(&sdp) {
                    Ok((neg, addr)) => {
                        info!(codec = ?neg.codec, remote_media = %addr, "the ACK answered our offer");
                        Some((neg, addr))
                    }
                    Err(e) => {
                        warn!(error = %e, empty = sdp.is_empty(), "no usable answer in the ACK to our offer; BYE");
                        call.handle.hangup().await;
                        None
                    }
                };
            }
            DialogEvent::Bye
            | DialogEvent::Cancelled
            | DialogEvent::Timeout
            | DialogEvent::Lost => {
                info!("the call ended before the ACK answered our offer");
                return None;
            }
            _ => {}
        }
    }
}
