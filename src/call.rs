//! Calls: where a SIP dialog, its media and the caller-facing logic meet.
//!
//! [`accept_calls`] takes each new INVITE from the UA core, checks limits, does SDP
//! offer/answer, binds the call's RTP port and answers; then one task per call ([`run_call`])
//! owns that port and drives the [`MediaSession`] (20 ms send tick, incoming RTP, DTMF) and the
//! call's [`CallApp`] (what the caller hears and what keys do), inside one tracing span that
//! names the call-id and caller.
//!
//! The seam for later layers is [`CallApp`]: it receives [`AppInput`]s (call started, a digit,
//! prompts finished) and answers with [`AppAction`]s (play, stop, hang up). The menu engine and
//! dispatch plug in there; this module never decides what a caller hears.

use crate::config::{Limits, PortRange};
use crate::media::dtmf::dtmf_info_digit;
use crate::media::g711::Codec;
use crate::media::prompt::{Prompt, PromptStore};
use crate::media::sdp::{self, Negotiated};
use crate::media::session::{MediaEvent, MediaSession, MAX_PACKET};
use crate::sip::ua::{AppEvent, DialogEvent, DialogHandle, IncomingCall};
use bytes::Bytes;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

/// Codecs we offer/accept, in our order of preference when the caller has none.
pub const SUPPORTED_CODECS: [Codec; 2] = [Codec::Pcmu, Codec::Pcma];
/// Packet time.
pub const PTIME: Duration = Duration::from_millis(20);

/// Input to a call's application logic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppInput {
    /// The call was answered and media is flowing.
    Started,
    /// The caller pressed a key (RFC 4733 or SIP INFO).
    Digit(char),
    /// Everything queued has been played.
    PlayDone,
}

/// What the application wants done.
#[derive(Debug, Clone)]
pub enum AppAction {
    /// Queue these prompts (by name, in the call's language).
    Play(Vec<String>),
    /// Stop playing and drop the queue.
    Stop,
    /// End the call.
    Hangup,
}

/// The caller-facing logic of one call.
pub trait CallApp: Send {
    fn on_input(&mut self, input: AppInput) -> Vec<AppAction>;
    /// The language prompts are played in.
    fn language(&self) -> &str;
}

/// The pre-menu test application: a welcome prompt, then every key read back (barge-in).
pub struct EchoApp {
    language: String,
}

impl EchoApp {
    pub fn new(language: &str) -> Self {
        EchoApp {
            language: language.to_owned(),
        }
    }
}

/// The prompt that speaks a key.
pub fn digit_prompt(d: char) -> Option<String> {
    match d {
        '0'..='9' => Some(format!("digit_{d}")),
        '*' => Some("star".into()),
        '#' => Some("pound".into()),
        _ => None,
    }
}

impl CallApp for EchoApp {
    fn on_input(&mut self, input: AppInput) -> Vec<AppAction> {
        match input {
            AppInput::Started => vec![AppAction::Play(vec!["welcome".into()])],
            AppInput::Digit(d) => {
                let mut v = vec![AppAction::Stop];
                if let Some(p) = digit_prompt(d) {
                    v.push(AppAction::Play(vec![p]));
                }
                v
            }
            AppInput::PlayDone => vec![],
        }
    }

    fn language(&self) -> &str {
        &self.language
    }
}

/// Who is calling and what they dialled, for the application.
#[derive(Debug, Clone)]
pub struct CallMeta {
    pub call_id: String,
    /// The caller's number (P-Asserted-Identity, else From user).
    pub caller: String,
    /// The number dialled (Request-URI user), e.g. `311`.
    pub dialled: String,
}

/// What the registry knows of a live call (for /health and the admin API).
#[derive(Debug, Clone)]
pub struct CallInfo {
    pub call_id: String,
    pub caller: String,
    pub started: Instant,
    pub rtp_port: u16,
}

/// Live calls, shared with the HTTP API.
#[derive(Debug, Default)]
pub struct CallRegistry {
    calls: DashMap<u64, CallInfo>,
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

    fn insert(&self, info: CallInfo) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.calls.insert(id, info);
        id
    }

    fn remove(&self, id: u64) {
        if self.calls.remove(&id).is_some() {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The RTP port pool: one even port per call from `--rtp-ports`, returned when the call ends.
#[derive(Debug)]
pub struct PortPool {
    free: Mutex<VecDeque<u16>>,
    bind_ip: IpAddr,
}

/// A bound RTP port; the port goes back to the pool when this is dropped.
pub struct RtpPort {
    pub socket: UdpSocket,
    pub port: u16,
    pool: Arc<PortPool>,
}

impl Drop for RtpPort {
    fn drop(&mut self) {
        if let Ok(mut f) = self.pool.free.lock() {
            f.push_back(self.port);
        }
    }
}

impl PortPool {
    pub fn new(range: PortRange, bind_ip: IpAddr) -> Arc<Self> {
        // Even ports only (RFC 3550 §11), leaving odd ones for RTCP.
        let first = range.lo + (range.lo % 2);
        let free = (first..=range.hi).step_by(2).collect();
        Arc::new(PortPool {
            free: Mutex::new(free),
            bind_ip,
        })
    }

    pub fn available(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Take a port and bind it; ports in use by another program are skipped (and kept out).
    pub fn allocate(self: &Arc<Self>) -> Option<RtpPort> {
        for _ in 0..64 {
            let port = self.free.lock().ok()?.pop_front()?;
            let std = match std::net::UdpSocket::bind(SocketAddr::new(self.bind_ip, port)) {
                Ok(s) => s,
                Err(e) => {
                    debug!(port, error = %e, "rtp port busy; trying the next");
                    // Put it at the back: it may be free later.
                    if let Ok(mut f) = self.free.lock() {
                        f.push_back(port);
                    }
                    continue;
                }
            };
            if std.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(socket) = UdpSocket::from_std(std) else {
                continue;
            };
            return Some(RtpPort {
                socket,
                port,
                pool: self.clone(),
            });
        }
        None
    }
}

/// The local IP that routes to `remote` (no packet is sent: a UDP connect only picks a route).
pub fn local_ip_for(remote: IpAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(SocketAddr::new(remote, 9)).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Makes the [`CallApp`] for each new call.
pub type AppFactory = Arc<dyn Fn(&CallMeta) -> Box<dyn CallApp> + Send + Sync>;

/// Everything a call needs that outlives it.
#[derive(Clone)]
pub struct CallContext {
    pub prompts: Arc<PromptStore>,
    pub registry: Arc<CallRegistry>,
    pub ports: Arc<PortPool>,
    pub limits: Limits,
    pub advertise_ip: Option<IpAddr>,
    pub default_language: String,
    /// Ring (180) this long before answering; zero answers at once.
    pub answer_after: Duration,
    /// Makes the application for each new call.
    pub app_factory: AppFactory,
    /// Stops accepting new calls (shutdown); calls in progress keep going.
    pub draining: CancellationToken,
}

/// Take new calls from the UA core until it closes.
pub async fn accept_calls(
    mut app_rx: mpsc::Receiver<AppEvent>,
    ctx: CallContext,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = app_rx.recv() => match ev { Some(ev) => ev, None => return },
        };
        match ev {
            AppEvent::Invite(call) => {
                let span = info_span!("call", call_id = %call.call_id, caller = %caller_id(&call));
                let (ctx, cancel) = (ctx.clone(), cancel.clone());
                // Each call sets itself up in its own task, so a slow answer (ringing) never
                // holds up the next caller.
                tracker.spawn(
                    async move {
                        if let Some(setup) = setup_call(&ctx, call).await {
                            run_call(setup, ctx, cancel).await;
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// The caller's number or user, for logs and tickets.
pub fn caller_id(call: &IncomingCall) -> String {
    // P-Asserted-Identity is the trunk's word for who is calling; prefer it.
    let pai = call
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("P-Asserted-Identity"))
        .and_then(|h| crate::sip::message::NameAddr::parse(&h.value).ok());
    pai.as_ref()
        .and_then(|n| n.user().map(str::to_owned))
        .or_else(|| call.from.user().map(str::to_owned))
        .unwrap_or_else(|| "anonymous".into())
}

struct CallSetup {
    call: IncomingCall,
    meta: CallMeta,
    port: RtpPort,
    media: MediaSession,
    local_media: SocketAddr,
    session_id: u64,
    registry_id: u64,
}

async fn reject(call: &IncomingCall, code: u16, reason: &str, headers: Vec<(String, String)>) {
    call.handle.respond(code, reason, headers, None).await;
}

/// Limits, SDP offer/answer, RTP port, 200 OK.
async fn setup_call(ctx: &CallContext, call: IncomingCall) -> Option<CallSetup> {
    let retry = || vec![("Retry-After".to_owned(), "30".to_owned())];
    if ctx.draining.is_cancelled() {
        info!("shutting down; call refused");
        ctx.registry.rejected.fetch_add(1, Ordering::Relaxed);
        reject(&call, 503, "Service Unavailable", retry()).await;
        return None;
    }
    if ctx.registry.len() >= ctx.limits.max_calls {
        warn!(max_calls = ctx.limits.max_calls, "call limit reached; 503");
        ctx.registry.rejected.fetch_add(1, Ordering::Relaxed);
        reject(&call, 503, "Service Unavailable", retry()).await;
        return None;
    }
    let is_sdp = call
        .content_type
        .as_deref()
        .is_some_and(|c| c.trim().to_ascii_lowercase().starts_with("application/sdp"));
    if !is_sdp || call.body.is_empty() {
        // We do not do offerless INVITEs (offer in our 200, answer in ACK) yet.
        warn!("INVITE without an SDP offer; 488");
        ctx.registry.rejected.fetch_add(1, Ordering::Relaxed);
        let w = vec![(
            "Warning".into(),
            "399 ivr311 \"an SDP offer is required\"".into(),
        )];
        reject(&call, 488, "Not Acceptable Here", w).await;
        return None;
    }
    let negotiated = sdp::parse(&call.body).and_then(|offer| {
        let neg = sdp::negotiate(&offer, &SUPPORTED_CODECS)?;
        Ok((offer, neg))
    });
    let (offer, neg) = match negotiated {
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
            reject(&call, 488, "Not Acceptable Here", w).await;
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
        reject(&call, 503, "Service Unavailable", retry()).await;
        return None;
    };
    let ip = ctx
        .advertise_ip
        .or_else(|| {
            let bound = port.socket.local_addr().ok()?.ip();
            (!bound.is_unspecified()).then_some(bound)
        })
        .or_else(|| local_ip_for(offer.addr.ip()))
        .unwrap_or(call.local.ip());
    let local_media = SocketAddr::new(ip, port.port);
    let session_id: u64 = rand::random::<u32>() as u64;
    // The offer parsed a moment ago; building our answer from it cannot fail in practice,
    // but if it does, fall back to a single audio line.
    let answer = sdp::build_answer_for_offer(&call.body, local_media, session_id, 1, &neg)
        .unwrap_or_else(|_| sdp::build_answer(local_media, session_id, 1, &neg));
    let media = MediaSession::new(now(), neg, offer.addr);
    let registry_id = ctx.registry.insert(CallInfo {
        call_id: call.call_id.clone(),
        caller: caller_id(&call),
        started: now(),
        rtp_port: port.port,
    });
    info!(codec = ?neg.codec, rtp_port = port.port, remote_media = %offer.addr, "answering");
    call.handle
        .respond(
            200,
            "OK",
            vec![],
            Some(("application/sdp".into(), Bytes::from(answer))),
        )
        .await;
    let meta = CallMeta {
        call_id: call.call_id.clone(),
        caller: caller_id(&call),
        dialled: crate::sip::message::uri_user(&call.request_uri)
            .unwrap_or_default()
            .to_owned(),
    };
    Some(CallSetup {
        call,
        meta,
        port,
        media,
        local_media,
        session_id,
        registry_id,
    })
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Why a call ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    CallerHungUp,
    Cancelled,
    AppHungUp,
    NoMedia,
    MaxDuration,
    SignallingTimeout,
    Shutdown,
}

/// One call's task.
async fn run_call(setup: CallSetup, ctx: CallContext, cancel: CancellationToken) {
    let CallSetup {
        call,
        meta,
        port,
        mut media,
        local_media,
        session_id,
        registry_id,
    } = setup;
    let IncomingCall {
        handle, mut events, ..
    } = call;
    let mut app = (ctx.app_factory)(&meta);
    let reason = call_loop(
        &ctx,
        &handle,
        &mut events,
        &port,
        &mut media,
        app.as_mut(),
        local_media,
        session_id,
        cancel,
    )
    .await;
    match reason {
        EndReason::CallerHungUp | EndReason::Cancelled | EndReason::SignallingTimeout => {}
        _ => handle.hangup().await,
    }
    handle.release();
    ctx.registry.remove(registry_id);
    let s = media.stats;
    ctx.registry
        .rtp_in
        .fetch_add(s.packets_in, Ordering::Relaxed);
    ctx.registry
        .rtp_out
        .fetch_add(s.packets_out, Ordering::Relaxed);
    ctx.registry.digits.fetch_add(s.digits, Ordering::Relaxed);
    info!(
        ?reason,
        packets_in = s.packets_in,
        packets_out = s.packets_out,
        digits = s.digits,
        malformed_in = s.malformed_in,
        foreign_in = s.foreign_in,
        "call ended"
    );
    drop(port);
}

#[allow(clippy::too_many_arguments)]
async fn call_loop(
    ctx: &CallContext,
    handle: &DialogHandle,
    events: &mut mpsc::Receiver<DialogEvent>,
    port: &RtpPort,
    media: &mut MediaSession,
    app: &mut dyn CallApp,
    local_media: SocketAddr,
    session_id: u64,
    cancel: CancellationToken,
) -> EndReason {
    let started = now();
    let mut confirmed = false;
    let mut version = 1u64;
    let mut tick = tokio::time::interval(PTIME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut last_tick: Option<tokio::time::Instant> = None;
    let mut buf = [0u8; 2048];
    let mut out = [0u8; MAX_PACKET];
    let no_media = Duration::from_secs(ctx.limits.no_media_seconds);
    let max_call = Duration::from_secs(ctx.limits.max_call_seconds);
    let mut inputs: VecDeque<AppInput> = VecDeque::new();
    inputs.push_back(AppInput::Started);
    let mut logged_foreign = false;
    let mut logged_malformed = false;

    loop {
        // Let the app react to everything that happened before waiting again.
        while let Some(input) = inputs.pop_front() {
            for action in app.on_input(input) {
                match action {
                    AppAction::Play(names) => {
                        let lang = app.language().to_owned();
                        let prompts: Vec<Arc<Prompt>> = names
                            .iter()
                            .filter_map(|n| {
                                let p = ctx
                                    .prompts
                                    .get(&lang, n)
                                    .or_else(|| ctx.prompts.get(&ctx.default_language, n));
                                if p.is_none() {
                                    warn!(prompt = %n, language = %lang, "prompt missing; skipped");
                                }
                                p
                            })
                            .collect();
                        let was_playing = media.is_playing();
                        media.play(prompts);
                        if !was_playing && !media.is_playing() {
                            inputs.push_back(AppInput::PlayDone);
                        }
                    }
                    AppAction::Stop => media.stop(),
                    AppAction::Hangup => return EndReason::AppHungUp,
                }
            }
        }

        tokio::select! {
            biased;
            _ = cancel.cancelled() => return EndReason::Shutdown,
            ev = events.recv() => {
                let Some(ev) = ev else { return EndReason::SignallingTimeout };
                match ev {
                    DialogEvent::Confirmed => confirmed = true,
                    DialogEvent::Cancelled => return EndReason::Cancelled,
                    DialogEvent::Bye => return EndReason::CallerHungUp,
                    DialogEvent::Timeout => return EndReason::SignallingTimeout,
                    DialogEvent::Info { content_type, body } => {
                        if let Some(d) = dtmf_info_digit(&content_type, &body) {
                            media.stats.digits += 1;
                            inputs.push_back(AppInput::Digit(d));
                        }
                    }
                    DialogEvent::Reoffer { txn, body, .. } => {
                        version += 1;
                        let answer = reoffer(media, &body, local_media, session_id, version);
                        match answer {
                            Ok(sdp) => handle.answer_reoffer(txn, 200, Some(("application/sdp".into(), Bytes::from(sdp)))).await,
                            Err(e) => {
                                warn!(error = %e, "re-offer refused; 488 and the call goes on");
                                handle.answer_reoffer(txn, 488, None).await;
                            }
                        }
                    }
                    DialogEvent::RequestOutcome { .. } | DialogEvent::Notify { .. } => {}
                }
            }
            r = port.socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                match media.on_rtp(now(), from, &buf[..n]) {
                    Ok(Some(MediaEvent::Digit(d))) => {
                        debug!(digit = %d, "digit");
                        inputs.push_back(AppInput::Digit(d));
                    }
                    Ok(_) => {
                        if media.stats.foreign_in > 0 && !logged_foreign {
                            logged_foreign = true;
                            warn!(%from, "RTP from an unexpected address after latching; dropped");
                        }
                    }
                    Err(e) => {
                        if !logged_malformed {
                            logged_malformed = true;
                            warn!(%from, error = %e, "garbage on the RTP port; dropped");
                        }
                    }
                }
            }
            at = tick.tick() => {
                if let Some(prev) = last_tick {
                    let gap = at.duration_since(prev);
                    let missed = (gap.as_millis() / PTIME.as_millis()).saturating_sub(1) as u32;
                    if missed > 0 {
                        media.skip_ticks(missed);
                    }
                }
                last_tick = Some(at);
                let (n, ev) = media.on_tick(&mut out);
                if n > 0 {
                    let _ = port.socket.try_send_to(&out[..n], media.remote());
                }
                if ev == Some(MediaEvent::PlayDone) {
                    inputs.push_back(AppInput::PlayDone);
                }
                let t = now();
                if t.duration_since(media.last_rx()) > no_media {
                    info!(seconds = no_media.as_secs(), "no media from the caller; hanging up");
                    return EndReason::NoMedia;
                }
                if t.duration_since(started) > max_call {
                    info!("call reached its maximum length; hanging up");
                    return EndReason::MaxDuration;
                }
                let _ = confirmed;
            }
        }
    }
}

/// Answer a re-INVITE/UPDATE offer: new direction (hold), address or codec.
fn reoffer(
    media: &mut MediaSession,
    body: &[u8],
    local_media: SocketAddr,
    session_id: u64,
    version: u64,
) -> Result<String, sdp::SdpError> {
    if body.is_empty() {
        // No offer: we offer what we have (RFC 3261 §14.2); the ACK carries the answer.
        return Ok(sdp::build_answer(
            local_media,
            session_id,
            version,
            &media.negotiated(),
        ));
    }
    let offer = sdp::parse(body)?;
    let neg: Negotiated = sdp::negotiate(&offer, &SUPPORTED_CODECS)?;
    media.renegotiate(neg, offer.addr);
    info!(direction = ?neg.direction, "media renegotiated");
    sdp::build_answer_for_offer(body, local_media, session_id, version, &neg)
}
