//! A supervisor on an operator's call: listen, whisper, barge ([`crate::media::mix`]).
//!
//! A registered agent whose config says `role: supervisor` dials a feature code and an
//! agent's id from their phone (`*51<agent>` listen, `*52<agent>` whisper, `*53<agent>` barge;
//! the codes are `monitor:` in the config). The INVITE reaches us as any agent's own call does
//! (digest-authenticated, from the agent's registered address: `super::consult`), and
//! [`run_monitor`] answers it:
//!
//! | case | answer |
//! | --- | --- |
//! | the caller is not a supervisor | `403` |
//! | no agent has that id | `404` |
//! | the agent is not on a call | `480` |
//! | the call is not bridged any more, or has a supervisor already | `480`, `486` |
//! | otherwise | `200`: the supervisor's media joins the caller's bridge on the media clock |
//!
//! While it lasts, keys 4, 5 and 6 on the supervisor's phone switch to listen, whisper and
//! barge (as Asterisk's ChanSpy). It ends when the supervisor hangs up (the bridge goes on as
//! before), or when the bridge ends (the caller or the operator hangs up, a transfer takes
//! the caller elsewhere) or a browser's media fails for good (no ICE and DTLS in time,
//! consent expired): the supervisor's phone then gets BYE.
//!
//! The admin API and the wallboard start the same with [`Monitors::start`]: the server calls
//! the supervisor's registered contact, a phone with plain RTP or a browser (registered over
//! `/sip`) with WebRTC, as an operator's leg to a browser is ([`crate::call::driver`]); the
//! media clock then runs the browser's ICE, DTLS and SRTP on the monitor's port. The request's
//! token, if any, goes back in the INVITE (`X-311-Monitor-Token`) so that the page that asked
//! answers that INVITE and no other.
//!
//! Every start, mode change and stop is written to the admins' audit log (tracing target
//! `ivr311::audit`, fields `supervisor`, `agent`, `call_id`, `mode`, `seconds`), never the
//! caller's number.

use super::driver::{now, CallContext};
use super::leg::{LegReoffer, LegSdp};
use super::registry::MonitorRequest;
use super::SUPPORTED_CODECS;
use crate::media::clock::{BrowserMedia, Monitor, MonitorLink, MonitorNote, SharedWebRtc};
use crate::media::g711::Codec;
use crate::media::mix::MonitorMode;
use crate::media::rtp::LatchScope;
use crate::media::sdp;
use crate::media::webrtc::{DtlsIdentity, WebRtcLeg};
use crate::sip::message::{sanitize_quoted, Method};
use crate::sip::refer::reason_phrase;
use crate::sip::transport::Transport;
use crate::sip::ua::{DialogEvent, DialogHandle, IncomingCall, LegEvent, OutboundCall};
use bytes::Bytes;
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Keys a supervisor's phone may send unread before the newest are dropped.
const NOTES: usize = 16;

/// The `monitor:` section: the feature codes a supervisor dials before an agent's id.
///
/// ```yaml
/// monitor: {listen: "*51", whisper: "*52", barge: "*53"}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "MonitorYaml")]
pub struct MonitorConfig {
    /// Hear both sides; nobody hears the supervisor. Default `*51`.
    pub listen: String,
    /// Hear both sides; the operator hears the supervisor, the caller does not. Default `*52`.
    pub whisper: String,
    /// All three talk. Default `*53`.
    pub barge: String,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            listen: "*51".into(),
            whisper: "*52".into(),
            barge: "*53".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct MonitorYaml {
    listen: String,
    whisper: String,
    barge: String,
}

impl Default for MonitorYaml {
    fn default() -> Self {
        let d = MonitorConfig::default();
        MonitorYaml {
            listen: d.listen,
            whisper: d.whisper,
            barge: d.barge,
        }
    }
}

/// Why `monitor:` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MonitorConfigError {
    #[error("code {0:?} must be 1 to 8 of the keys 0-9, * and #")]
    Code(String),
    #[error("code {0:?} starts code {1:?}: a supervisor could never dial the longer one")]
    Prefix(String, String),
}

impl TryFrom<MonitorYaml> for MonitorConfig {
    type Error = MonitorConfigError;

    fn try_from(y: MonitorYaml) -> Result<Self, Self::Error> {
        let c = MonitorConfig {
            listen: y.listen,
            whisper: y.whisper,
            barge: y.barge,
        };
        let codes = [&c.listen, &c.whisper, &c.barge];
        for code in codes {
            let keys = code
                .chars()
                .all(|k| k.is_ascii_digit() || k == '*' || k == '#');
            if code.is_empty() || code.len() > 8 || !keys {
                return Err(MonitorConfigError::Code(code.clone()));
            }
        }
        for (i, a) in codes.iter().enumerate() {
            for (j, b) in codes.iter().enumerate() {
                if i != j && b.starts_with(a.as_str()) {
                    return Err(MonitorConfigError::Prefix((*a).clone(), (*b).clone()));
                }
            }
        }
        Ok(c)
    }
}

impl MonitorConfig {
    /// The mode and the agent's id a dialled user part asks for, if it starts with a code.
    pub fn parse<'a>(&self, dialled: &'a str) -> Option<(MonitorMode, &'a str)> {
        [
            (&self.listen, MonitorMode::Listen),
            (&self.whisper, MonitorMode::Whisper),
            (&self.barge, MonitorMode::Barge),
        ]
        .into_iter()
        .find_map(|(code, mode)| Some((mode, dialled.strip_prefix(code.as_str())?)))
        .filter(|(_, agent)| !agent.is_empty())
    }
}

/// What the calls need to know to let supervisors in.
#[derive(Debug, Clone, Default)]
pub(crate) struct Monitoring {
    pub(crate) codes: MonitorConfig,
    /// Agents with `role: supervisor`.
    pub(crate) supervisors: HashSet<String>,
    /// Every agent's id.
    pub(crate) agents: HashSet<String>,
}

impl Monitoring {
    pub(crate) fn new(codes: MonitorConfig, agents: &[crate::config::AgentConfig]) -> Self {
        Monitoring {
            codes,
            supervisors: agents
                .iter()
                .filter(|a| a.role == crate::config::AgentRole::Supervisor)
                .map(|a| a.id.clone())
                .collect(),
            agents: agents.iter().map(|a| a.id.clone()).collect(),
        }
    }
}

/// Why a supervisor cannot join a call: the SIP (and HTTP) status and a sentence.
pub(crate) type Refusal = (u16, String);

/// Whether `supervisor` may monitor `agent`'s call: the call's registry id, or why not.
pub(crate) fn target_call(
    ctx: &CallContext,
    supervisor: &str,
    agent: &str,
) -> Result<u64, Refusal> {
    if !ctx.monitoring.supervisors.contains(supervisor) {
        return Err((403, "only supervisors may monitor calls".into()));
    }
    if !ctx.monitoring.agents.contains(agent) {
        return Err((404, format!("no agent {agent}")));
    }
    if agent == supervisor {
        return Err((403, "a supervisor cannot monitor their own call".into()));
    }
    match ctx.registry.caller_of(agent) {
        Some((id, _, _)) => Ok(id),
        None => Err((480, format!("agent {agent} is not on a call"))),
    }
}

/// Answer a supervisor's INVITE to `*5x<agent>` (`mode`, `agent`): join the agent's call
/// and keep the supervisor on it until either side ends.
pub(crate) async fn run_monitor(
    call: IncomingCall,
    supervisor: String,
    (mode, agent): (MonitorMode, String),
    ctx: CallContext,
    cancel: CancellationToken,
) {
    let refuse = async |call: &IncomingCall, (code, why): Refusal| {
        let w = vec![(
            "Warning".to_owned(),
            format!("399 ivr311 \"{}\"", sanitize_quoted(&why)),
        )];
        call.handle
            .respond(code, reason_phrase(code), w, None)
            .await;
        call.handle.release();
    };
    let count = |reason: &str| {
        ctx.metrics.add(
            "ivr311_monitor_refusals_total",
            "Supervisors' requests to listen, whisper or barge that were refused, by reason.",
            &[("reason", reason)],
            1,
        )
    };
    let id = match target_call(&ctx, &supervisor, &agent) {
        Ok(id) => id,
        Err(r) => {
            info!(%supervisor, %agent, code = r.0, reason = %r.1, "a request to monitor a call refused");
            count(match r.0 {
                403 => "forbidden",
                404 => "no_agent",
                _ => "not_on_call",
            });
            return refuse(&call, r).await;
        }
    };
    let offered = sdp::parse(&call.body).and_then(|offer| {
        let neg = sdp::negotiate(&offer, &SUPPORTED_CODECS)?;
        Ok((offer, neg))
    });
    let (offer, neg) = match offered {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "a supervisor's call without an offer we can take; 488");
            count("no_offer");
            return refuse(&call, (488, e.to_string())).await;
        }
    };
    let Some(port) = ctx.ports.allocate() else {
        warn!("no RTP port free for a supervisor's call; 503");
        return refuse(&call, (503, "no media port free".into())).await;
    };
    let ip = ctx
        .advertise_ip
        .or_else(|| {
            let bound = port.socket.local_addr().ok()?.ip();
            (!bound.is_unspecified()).then_some(bound)
        })
        .or_else(|| crate::sip::transport::local_ip_towards(offer.addr.ip()))
        .unwrap_or(call.local.ip());
    let local = SocketAddr::new(ip, port.port);
    let session_id = u64::from(rand::random::<u32>());
    let answer = sdp::build_answer_for_offer(&call.body, local, session_id, 1, &neg)
        .unwrap_or_else(|_| sdp::build_answer(local, session_id, 1, &neg));
    let link = MonitorLink::new(mode);
    let (notes_tx, notes) = mpsc::channel(NOTES);
    let scope = LatchScope::SdpOr(call.source.ip());
    let monitor = Monitor::new(port, (offer.addr, scope), neg, link.clone(), notes_tx);
    let call_id = ctx.registry.call_id(id).unwrap_or_default();
    if let Err(r) = ctx
        .registry
        .monitor(id, MonitorRequest(Box::new(monitor)))
        .await
    {
        info!(%supervisor, %agent, code = r.0, reason = %r.1, "the call would not take a supervisor");
        count(if r.0 == 486 {
            "monitored"
        } else {
            "not_on_call"
        });
        return refuse(&call, r).await;
    }
    call.handle
        .respond(
            200,
            "OK",
            vec![],
            Some(("application/sdp".into(), Bytes::from(answer.clone()))),
        )
        .await;
    let who = Who {
        supervisor,
        agent,
        call_id,
        mode,
    };
    let IncomingCall { handle, events, .. } = call;
    stay(
        &ctx,
        &handle,
        Events::Incoming(events),
        OurSdp::Answer(Bytes::from(answer)),
        (link, notes),
        who,
        cancel,
    )
    .await;
}

/// Who monitors which call, as the audit names them.
struct Who {
    supervisor: String,
    agent: String,
    call_id: String,
    mode: MonitorMode,
}

/// The supervisor's dialog: their phone's call to a code, or our call to their phone.
enum Events {
    Incoming(mpsc::Receiver<DialogEvent>),
    Outgoing(mpsc::Receiver<LegEvent>),
}

impl Events {
    /// The dialog's next event (`None`: it is gone).
    async fn next(&mut self) -> Option<DialogEvent> {
        match self {
            Events::Incoming(rx) => rx.recv().await,
            Events::Outgoing(rx) => loop {
                match rx.recv().await? {
                    LegEvent::Dialog(ev) => return Some(ev),
                    LegEvent::Failed { .. } => return None,
                    LegEvent::Provisional { .. } | LegEvent::Answered { .. } => {}
                }
            },
        }
    }
}

/// What our side answers a re-INVITE or UPDATE of the supervisor's with.
enum OurSdp {
    /// The answer we gave to the supervisor's phone's own call: the media stays as it is.
    Answer(Bytes),
    /// Our call to the supervisor's phone or browser: the leg's SDP, its media as agreed, and
    /// a phone's media address (a browser's is where ICE finds it, whatever its SDP says).
    Leg(Box<LegSdp>, sdp::Negotiated, Option<SocketAddr>),
}

impl OurSdp {
    /// The status and body for a re-offer (`method`, `body`). The media clock keeps mixing
    /// the supervisor with the media agreed at the start, so an offer that would change its
    /// codec or address is refused (488: the call goes on as it was, RFC 3261 §14.2);
    /// a session refresh, or the same media offered again (a browser's re-INVITE carries its
    /// ICE and DTLS as they are), is answered.
    fn reoffer(&mut self, method: &Method, body: &[u8]) -> (u16, Option<(String, Bytes)>) {
        let sdp_body = |s: Bytes| Some(("application/sdp".to_owned(), s));
        match self {
            OurSdp::Answer(ours) => (200, sdp_body(ours.clone())),
            OurSdp::Leg(leg, neg, at) => match leg.reoffer(method, body, neg) {
                LegReoffer::Answer { neg: n, addr, .. }
                    if n.codec != neg.codec
                        || n.payload_type != neg.payload_type
                        || at.is_some_and(|at| at != addr) =>
                {
                    warn!("a supervisor's re-offer would move or change its media; 488");
                    (488, None)
                }
                r => r.response(),
            },
        }
    }
}

/// Keep the supervisor on the call (mixed in by the media clock) until they hang up or the
/// call's bridge ends; audit the start, each mode change and the end.
async fn stay(
    ctx: &CallContext,
    handle: &DialogHandle,
    mut events: Events,
    mut ours: OurSdp,
    (link, mut notes): (Arc<MonitorLink>, mpsc::Receiver<MonitorNote>),
    who: Who,
    cancel: CancellationToken,
) {
    let Who {
        supervisor,
        agent,
        call_id,
        mode,
    } = who;
    let started = now();
    let mut current = mode;
    info!(target: "ivr311::audit", %supervisor, %agent, %call_id, mode = mode.as_str(), "monitoring started");
    ctx.metrics.add(
        "ivr311_monitors_total",
        "Supervisors who joined an operator's call, by the mode they joined in.",
        &[("mode", mode.as_str())],
        1,
    );
    let mut phone_left = false;
    let why = loop {
        tokio::select! {
            () = cancel.cancelled() => break "shutdown",
            ev = events.next() => match ev {
                None | Some(
                    DialogEvent::Bye
                    | DialogEvent::Cancelled
                    | DialogEvent::Timeout
                    | DialogEvent::Lost,
                ) => {
                    phone_left = true;
                    break "supervisor_hung_up";
                }
                Some(DialogEvent::Reoffer { txn, method, body, .. }) => {
                    let (code, body) = ours.reoffer(&method, &body);
                    handle.answer_reoffer(txn, code, body).await;
                }
                Some(DialogEvent::Refer(r)) => {
                    handle.answer_request(r.txn, 403, vec![]).await;
                }
                Some(_) => {}
            },
            note = notes.recv() => match note {
                Some(MonitorNote::Key(k)) => {
                    if let Some(m) = MonitorMode::from_key(k).filter(|m| *m != current) {
                        info!(target: "ivr311::audit", %supervisor, %agent, %call_id, from = current.as_str(), mode = m.as_str(), "monitoring mode changed");
                        current = m;
                    }
                }
                Some(MonitorNote::MediaFailed) => break "media_failed",
                // The bridge ended (the caller or the operator hung up, a transfer).
                None => break "call_ended",
            },
        }
    };
    link.leave();
    let seconds = now().saturating_duration_since(started).as_secs();
    info!(target: "ivr311::audit", %supervisor, %agent, %call_id, mode = current.as_str(), seconds, why, "monitoring ended");
    if !phone_left {
        handle.hangup().await;
    }
    handle.release();
}

/// `POST /admin/calls/{call_id}/monitor` body (and the wallboard's
/// `/supervisor/api/calls/{call_id}/monitor`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorBody {
    pub mode: MonitorMode,
    /// The supervisor's agent id: their registered phone is called.
    pub supervisor: String,
    /// Sent back in the INVITE's `X-311-Monitor-Token` header, so that the page that asked
    /// (the wallboard) knows that INVITE for its own and answers it by itself.
    #[serde(default)]
    pub token: Option<MonitorToken>,
}

/// A token naming one request to monitor a call: 8 to 64 letters, digits, `-` and `_`
/// (it goes into a SIP header as it is).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MonitorToken(String);

/// Why a monitor token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a monitor token is 8 to 64 letters, digits, - and _")]
pub struct BadMonitorToken;

impl TryFrom<String> for MonitorToken {
    type Error = BadMonitorToken;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok = (8..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(MonitorToken(s))
        } else {
            Err(BadMonitorToken)
        }
    }
}

impl MonitorToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Monitoring started from HTTP: the server calls the supervisor's registered phone and
/// joins it to the call when it answers (within the agents' ring time). Held by the API.
#[derive(Clone)]
pub struct Monitors {
    ctx: CallContext,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Monitors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Monitors")
    }
}

impl Monitors {
    pub(crate) fn new(ctx: CallContext, cancel: CancellationToken) -> Self {
        Monitors { ctx, cancel }
    }

    /// Call supervisor `b.supervisor`'s phone (or browser, over WebRTC) to monitor call
    /// `call_id` (its Call-ID, as `/admin/calls` shows it) in `b.mode`. `Ok` once the phone is being called; the
    /// supervisor joins when they answer. Otherwise the HTTP status and why: 404 no such call,
    /// 403 not a supervisor, 409 the call is not with an operator or the supervisor's phone is
    /// not registered, 503 no media port.
    pub async fn start(&self, call_id: &str, b: &MonitorBody) -> Result<(), Refusal> {
        let ctx = &self.ctx;
        let supervisor = b.supervisor.as_str();
        let id = ctx
            .registry
            .id_of(call_id)
            .ok_or((404, "no such call".to_owned()))?;
        let agent = ctx
            .registry
            .operator_on(id)
            .ok_or((409, "the call is not with an operator".to_owned()))?;
        match target_call(ctx, supervisor, &agent) {
            Ok(on) if on == id => {}
            Ok(_) | Err((480, _)) => return Err((409, "the call is not with an operator".into())),
            Err(r) => return Err(r),
        }
        let Some((contact, flow)) = ctx
            .agent_contacts
            .get(supervisor)
            .map(|c| c.value().clone())
        else {
            return Err((
                409,
                format!("supervisor {supervisor}'s phone is not registered"),
            ));
        };
        let Some(port) = ctx.ports.allocate() else {
            return Err((503, "no media port free".into()));
        };
        let toward = flow.remote.ip();
        let preferred = ctx.advertise_ip.unwrap_or_else(|| {
            port.socket
                .local_addr()
                .map(|a| a.ip())
                .ok()
                .filter(|ip| !ip.is_unspecified())
                .or_else(|| crate::sip::transport::local_ip_towards(toward))
                .unwrap_or(toward)
        });
        let ip = super::driver::leg_media_ip(preferred, &port, Some(toward));
        let local = SocketAddr::new(ip, port.port);
        // A supervisor registered over a WebSocket is a browser (the wallboard): the leg is
        // WebRTC, as an operator's leg to a browser is.
        let webrtc = match flow.transport {
            Transport::Ws | Transport::Wss => match DtlsIdentity::shared() {
                Ok(identity) => Some(Arc::new(std::sync::Mutex::new(BrowserMedia::new(
                    WebRtcLeg::new(identity, std::time::Instant::now()),
                )))),
                Err(e) => {
                    error!(error = %e, "no DTLS certificate: cannot call a supervisor's browser");
                    return Err((503, "no DTLS certificate for browser audio".into()));
                }
            },
            _ => None,
        };
        let sdp = match &webrtc {
            None => LegSdp::new(local),
            Some(w) => LegSdp::new_webrtc(local, lock(w).leg.local().clone()),
        };
        let offer = Bytes::from(sdp.offer(Codec::Pcmu));
        let mut headers = vec![(
            "X-311-Monitor".to_owned(),
            format!("{} {agent}", b.mode.as_str()),
        )];
        if let Some(token) = &b.token {
            headers.push(("X-311-Monitor-Token".to_owned(), token.as_str().to_owned()));
        }
        info!(%supervisor, %agent, %call_id, mode = b.mode.as_str(), "calling a supervisor's phone to monitor a call");
        let call = ctx
            .outbound
            .invite_via(
                &contact,
                flow,
                "monitor",
                Some("311 monitor"),
                headers,
                offer,
            )
            .await;
        let who = Who {
            supervisor: supervisor.to_owned(),
            agent,
            call_id: call_id.to_owned(),
            mode: b.mode,
        };
        ctx.tracker.spawn(ring_and_join(
            ctx.clone(),
            call,
            Ours {
                port,
                toward,
                sdp,
                webrtc,
            },
            id,
            who,
            self.cancel.clone(),
        ));
        Ok(())
    }
}

fn lock(w: &SharedWebRtc) -> std::sync::MutexGuard<'_, BrowserMedia> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Our side of the call to a supervisor's phone or browser.
struct Ours {
    port: crate::media::ports::RtpPort,
    /// Where the supervisor registered from (their media may come from there).
    toward: std::net::IpAddr,
    sdp: LegSdp,
    /// A browser's leg: its ICE, DTLS and SRTP.
    webrtc: Option<SharedWebRtc>,
}

/// Wait for the supervisor's phone to answer our call, then join it to call `id`.
async fn ring_and_join(
    ctx: CallContext,
    call: OutboundCall,
    ours: Ours,
    id: u64,
    who: Who,
    cancel: CancellationToken,
) {
    let OutboundCall { handle, mut events } = call;
    let until = tokio::time::Instant::now() + ctx.agent_ring;
    let answer = loop {
        tokio::select! {
            () = cancel.cancelled() => break None,
            () = tokio::time::sleep_until(until) => {
                info!(supervisor = %who.supervisor, "the supervisor's phone did not answer");
                break None;
            }
            ev = events.recv() => match ev {
                Some(LegEvent::Answered { sdp }) => break Some(sdp),
                Some(LegEvent::Failed { code, reason }) => {
                    info!(supervisor = %who.supervisor, code, %reason, "the supervisor's phone did not take the call");
                    handle.release();
                    return;
                }
                None => return,
                Some(_) => {}
            },
        }
    };
    let Some(answer) = answer else {
        handle.hangup().await;
        handle.release();
        return;
    };
    let Ours {
        port,
        toward,
        mut sdp,
        webrtc,
    } = ours;
    // A browser's answer is WebRTC only (and a phone's plain RTP only); it also gives the
    // browser's ICE credentials, fingerprint and DTLS role.
    let remote = match (&webrtc, sdp::parse_any(&answer)) {
        (Some(_), Ok(sdp::Remote::WebRtc(_, remote))) => Some(remote),
        _ => None,
    };
    let media = sdp.answer(&answer).map_err(|e| e.to_string());
    let media = media.and_then(|m| match (&webrtc, remote) {
        (Some(w), Some(remote)) => lock(w)
            .leg
            .set_remote(std::time::Instant::now(), remote)
            .map(|_| m)
            .map_err(|e| e.to_string()),
        _ => Ok(m),
    });
    let (neg, addr) = match media {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "the supervisor's phone answered with media we cannot take");
            handle.hangup().await;
            handle.release();
            return;
        }
    };
    let link = MonitorLink::new(who.mode);
    let (notes_tx, notes) = mpsc::channel(NOTES);
    let neg_kept = neg;
    let phone_at = webrtc.is_none().then_some(addr);
    let monitor = Monitor::new(
        port,
        (addr, LatchScope::SdpOr(toward)),
        neg,
        link.clone(),
        notes_tx,
    );
    let monitor = match webrtc {
        Some(w) => monitor.webrtc(w),
        None => monitor,
    };
    if let Err((code, why)) = ctx
        .registry
        .monitor(id, MonitorRequest(Box::new(monitor)))
        .await
    {
        info!(supervisor = %who.supervisor, code, reason = %why, "the call would not take the supervisor");
        handle.hangup().await;
        handle.release();
        return;
    }
    stay(
        &ctx,
        &handle,
        Events::Outgoing(events),
        OurSdp::Leg(Box::new(sdp), neg_kept, phone_at),
        (link, notes),
        who,
        cancel,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Result<MonitorConfig, serde_yaml::Error> {
        serde_yaml::from_str(s)
    }

    #[test]
    fn codes_default_parse_and_are_checked() {
        let c = MonitorConfig::default();
        assert_eq!(c.parse("*511001"), Some((MonitorMode::Listen, "1001")));
        assert_eq!(c.parse("*521001"), Some((MonitorMode::Whisper, "1001")));
        assert_eq!(c.parse("*531001"), Some((MonitorMode::Barge, "1001")));
        assert_eq!(c.parse("*51"), None);
        assert_eq!(c.parse("1001"), None);
        assert_eq!(c.parse("911"), None);
        let c = yaml("{listen: \"#1\", whisper: \"#2\", barge: \"#3\"}").unwrap();
        assert_eq!(c.parse("#31001"), Some((MonitorMode::Barge, "1001")));
        assert_eq!(yaml("{}").unwrap(), MonitorConfig::default());
        assert!(yaml("{listen: \"*5\"}").is_err(), "*5 starts *52");
        assert!(yaml("{listen: \"ab\"}").is_err());
        assert!(yaml("{listne: \"*1\"}").is_err());
    }

    #[test]
    fn a_monitor_token_is_a_short_word_fit_for_a_header() {
        let body = |t: &str| {
            serde_json::from_str::<MonitorBody>(&format!(
                r#"{{"mode": "listen", "supervisor": "1003", "token": {t}}}"#
            ))
        };
        let ok = body(r#""0123456789abcdef-_""#).unwrap();
        assert_eq!(ok.token.unwrap().as_str(), "0123456789abcdef-_");
        assert!(body("null").unwrap().token.is_none());
        for bad in [
            r#""short""#,
            r#""has space in it""#,
            r#""crlf
X-Evil: 1""#,
        ] {
            assert!(body(bad).is_err(), "{bad}");
        }
        assert!(body(&format!("\"{}\"", "a".repeat(65))).is_err());
    }
}
