//! Calls: where a SIP dialog, its media, the menu engine and dispatch meet.
//!
//! [`accept_calls`] takes each new INVITE from the UA core and gives it a task: limits, SDP
//! offer/answer, an RTP port, 200 OK; then [`run_call`] hands the port and the call's
//! [`MediaSession`] to the shared [`MediaClock`] (which sends and reads the call's RTP every
//! 20 ms and passes up keys and "prompt done") and drives, in one `select!` loop and one
//! tracing span (Call-ID and caller):
//! - the media notes; while the caller is bridged to an operator or 911 the clock also relays
//!   both legs' RTP ([`Bridge`]), so this task does not wake per packet,
//! - the [`Engine`] (menu walk): its outputs are carried out here (play, timer, record, file
//!   a ticket, look one up, redirect to 911, queue, hang up) and their results fed back,
//! - dialog events (BYE, re-INVITE, INFO digits, REFER progress).
//!
//! Database work runs in spawned tasks that report back through a channel, so a slow disk
//! never stalls the 20 ms packet clock. A ticket the caller was told about is always
//! committed first; a ticket whose caller hung up mid-recording is still filed.
//!
//! 911: the redirect is carried out here ([`EmergencyRun`]) with the policy of
//! [`crate::dispatch::emergency`]: the caller hears "connecting you to 911" while the audit
//! row is written, and the first method starts as soon as the row is durable: a bridge's
//! INVITE at once, during the notice (its ringback or early media follows the notice); a
//! REFER, which takes the caller's phone out of the call, and the spoken announcement once the
//! notice (about a second) has played. If the audit write fails the redirect goes ahead anyway
//! (and the failure is logged as an error): nothing may stand between a caller and 911, not
//! even our own database.

use crate::config::Limits;
use crate::dispatch::emergency::{EmergencyConfig, EmergencyMethod};
use crate::dispatch::offer::{
    agent_leg_step, asserted_identity, probe_says_gone, AgentLegStep, LegProbe, LegReoffer, LegSdp,
    OperatorOffer, PROBE_ANSWER_WITHIN,
};
use crate::dispatch::queue::{OfferFailure, Position, QueueEvent, QueueHandle};
use crate::dispatch::tickets::{Channel, EmergencyAudit, NewTicket, Status, TicketStore};
use crate::media::clock::{Bridge, MediaClock, MediaHandle, MediaNote};
use crate::media::dtmf::dtmf_info_digit;
use crate::media::g711::Codec;
use crate::media::ports::{PortPool, RtpPort};
use crate::media::prompt::{ringback, Prompt, PromptStore};
use crate::media::record::{Recorder, VoiceMeter};
use crate::media::rtp::LatchScope;
use crate::media::sdp::{self, Negotiated};
use crate::media::session::MediaSession;
use crate::menu::engine::{Engine, Input, Output, StatusResult, TicketRequest};
use crate::menu::schema::MenuFile;
use crate::sip::message::Method;
use crate::sip::ua::{AppEvent, DialogEvent, DialogHandle, IncomingCall, LegEvent, OutboundHandle};
use bytes::Bytes;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

/// Codecs we offer/accept, in our order of preference when the caller has none.
pub const SUPPORTED_CODECS: [Codec; 2] = [Codec::Pcmu, Codec::Pcma];
/// Packet time.
pub const PTIME: Duration = Duration::from_millis(20);
/// How long the 911 side's early media may fall silent before the caller hears our ringback
/// again. Longer than a pause in a spoken announcement; shorter than the time in which a
/// caller on a silent line decides it is dead.
const EARLY_MEDIA_GAP: Duration = Duration::from_secs(2);
/// How long a leg that holds the call may send nothing before the caller hears our hold
/// music (a phone that plays its own music on hold is heard instead).
const HOLD_FILL_GAP: Duration = Duration::from_millis(500);
/// How long a 911 trunk may stay silent (no ringing, no answer) before the next method.
pub const BRIDGE_FIRST_RESPONSE: Duration = Duration::from_secs(5);

/// The menu and prompts new calls start on. Replaced whole on reload; a call keeps the `Arc`
/// it started with, so calls in progress finish on their own menu and prompts. Prompts travel
/// with the menu so a reloaded menu never refers to a prompt that was not loaded.
#[derive(Debug, Clone)]
pub struct ActiveMenu {
    pub file: Arc<MenuFile>,
    /// The menu after screening (`top`).
    pub main: String,
    pub path: PathBuf,
    pub prompts: Arc<PromptStore>,
}

/// Why a menu could not be (re)loaded. The menu in service stays.
#[derive(Debug, thiserror::Error)]
pub enum MenuLoadError {
    #[error("prompts: {0}")]
    Prompts(#[from] crate::media::prompt::PromptError),
    #[error("prompts: no prompts found in {0}")]
    NoPrompts(String),
    /// `ivr311 check` problems, one `path:line:col: message` per line.
    #[error("{0}")]
    Menu(#[from] crate::menu::validate::MenuError),
}

impl MenuLoadError {
    /// The individual `path:line:col: message` lines (one line for other errors).
    pub fn lines(&self) -> Vec<String> {
        self.to_string().lines().map(str::to_owned).collect()
    }
}

/// Load prompts and a menu, and check the menu against them (blocking: file I/O and
/// resampling; run it off the async threads).
pub fn load_active_menu(menu: &Path, prompts_dir: &Path) -> Result<ActiveMenu, MenuLoadError> {
    use crate::menu::validate::{self, MenuError, PromptIndex};
    let index = PromptIndex::from_dir(prompts_dir).map_err(|source| MenuError::Io {
        path: prompts_dir.to_owned(),
        source,
    })?;
    let loaded = validate::load(menu, &index)?;
    let prompts = PromptStore::load_dir(prompts_dir)?;
    if prompts.is_empty() {
        return Err(MenuLoadError::NoPrompts(prompts_dir.display().to_string()));
    }
    Ok(ActiveMenu {
        file: Arc::new(loaded.file),
        main: loaded.main,
        path: loaded.path,
        prompts: Arc::new(prompts),
    })
}

/// Holder of the current menu, and where to reload it from.
#[derive(Debug)]
pub struct MenuHolder {
    current: RwLock<Arc<ActiveMenu>>,
    menu_path: PathBuf,
    prompts_dir: PathBuf,
    /// Serialises reloads (two admins at once).
    reloading: tokio::sync::Mutex<()>,
}

impl MenuHolder {
    pub fn new(menu: ActiveMenu, menu_path: PathBuf, prompts_dir: PathBuf) -> Self {
        MenuHolder {
            current: RwLock::new(Arc::new(menu)),
            menu_path,
            prompts_dir,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    pub fn get(&self) -> Arc<ActiveMenu> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn replace(&self, menu: ActiveMenu) {
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(menu),
            Err(p) => *p.into_inner() = Arc::new(menu),
        }
    }

    /// Validate the menu file (and prompts) again and swap it in for new calls; on any
    /// problem the menu in service stays and the problems are returned.
    pub async fn reload(&self) -> Result<Arc<ActiveMenu>, MenuLoadError> {
        let _one = self.reloading.lock().await;
        let (m, p) = (self.menu_path.clone(), self.prompts_dir.clone());
        let loaded = tokio::task::spawn_blocking(move || load_active_menu(&m, &p))
            .await
            .map_err(|_| MenuLoadError::NoPrompts("reload task failed".into()))??;
        self.replace(loaded);
        let now = self.get();
        info!(menu = %now.path.display(), menus = now.file.menus.len(), "menu reloaded for new calls");
        Ok(now)
    }
}

/// Who is calling and what they dialled, for the application.
#[derive(Debug, Clone)]
pub struct CallMeta {
    pub call_id: String,
    /// The caller's number as best known (asserted, else claimed: see [`CallerIdentity`]),
    /// for tickets, the audit and the operator's phone.
    pub caller: String,
    /// Whether anyone vouches for `caller`.
    pub identity: CallerIdentity,
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
    pub language: String,
    /// The menu the caller is in, or what is happening (`filing`, `emergency`...).
    pub state: String,
    /// Cancelled by an admin to hang the call up.
    pub hangup: CancellationToken,
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

    /// Hang up the call with this Call-ID (admin). False if there is none.
    pub fn hangup(&self, call_id: &str) -> bool {
        match self.calls.iter().find(|c| c.value().call_id == call_id) {
            Some(c) => {
                c.value().hangup.cancel();
                true
            }
            None => false,
        }
    }

    fn update(&self, id: u64, language: &str, state: &str) {
        if let Some(mut c) = self.calls.get_mut(&id) {
            if c.language != language {
                c.language = language.to_owned();
            }
            if c.state != state {
                c.state = state.to_owned();
            }
        }
    }

    fn remove(&self, id: u64) {
        if self.calls.remove(&id).is_some() {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Our media address in the SDP offer of a leg (911, an operator's phone) whose far end is
/// at `towards`: `preferred`, the address the caller's media uses (the advertised one, or
/// the interface towards the caller), when it is of the far end's family. A server bound to
/// `[::]` serves IPv4 and IPv6 on one port, so a caller over IPv6 may be bridged to a PSAP or
/// phone reachable only over IPv4, which could never send to an IPv6 address: the leg then
/// offers the local address of the far end's family that routes to it. Otherwise (a port
/// bound to one family, nothing of the other to offer) `preferred` stays.
pub fn leg_media_ip(preferred: IpAddr, port: &RtpPort, towards: Option<IpAddr>) -> IpAddr {
    let Some(far) = towards else {
        return preferred;
    };
    if preferred.is_ipv4() == far.is_ipv4() {
        return preferred;
    }
    let dual_stack = port
        .socket
        .local_addr()
        .is_ok_and(|a| a.is_ipv6() && a.ip().is_unspecified());
    if !dual_stack {
        return preferred;
    }
    crate::sip::transport::local_ip_towards(far)
        .filter(|ip| ip.is_ipv4() == far.is_ipv4())
        .unwrap_or(preferred)
}

/// Everything a call needs that outlives it.
#[derive(Clone)]
pub struct CallContext {
    pub registry: Arc<CallRegistry>,
    pub ports: Arc<PortPool>,
    pub limits: Limits,
    pub advertise_ip: Option<IpAddr>,
    pub default_language: String,
    /// Ring (180) this long before answering; zero answers at once.
    pub answer_after: Duration,
    pub menu: Arc<MenuHolder>,
    pub tickets: TicketStore,
    pub emergency: EmergencyConfig,
    /// Places outbound legs (the 911 bridge).
    pub outbound: OutboundHandle,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Operator queues; `None` when no agents are configured.
    pub queues: Option<QueueHandle>,
    /// Call-backs that keep the caller's place; `None` without `callback.trunk_uri`.
    pub callbacks: Option<crate::callback::Callbacks>,
    /// Where each logged-in agent's phone is reached.
    pub agent_contacts: Arc<DashMap<String, (String, crate::sip::transport::Flow)>>,
    /// Where caller recordings are written (`<dir>/<generated>.wav`).
    pub recordings: PathBuf,
    /// Owns work that must finish even if the call ends (filing an abandoned ticket).
    pub tracker: TaskTracker,
    /// Stops accepting new calls (shutdown); calls in progress keep going.
    pub draining: CancellationToken,
    /// The drain time is over: calls in a menu hear a goodbye and are hung up.
    pub closing: CancellationToken,
    /// Paces every call's RTP.
    pub clock: Arc<MediaClock>,
    /// `trunks.allow`: the sources whose P-Asserted-Identity is believed (none when empty).
    pub trusted: Arc<Vec<crate::sip::guard::IpNet>>,
    /// Which numbers may be called back, and how often (also without a call-back trunk:
    /// the flagged ticket asks staff to call).
    pub callback: Arc<crate::config::CallbackConfig>,
    /// How log lines show callers' numbers.
    pub log: crate::config::LogConfig,
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
            AppEvent::Invite(mut call) => {
                // RFC 3325: P-Asserted-Identity only from inside the trust domain; from anyone
                // else it is removed, so nothing further on can mistake it for verified.
                let identity = identify(&mut call, &ctx.trusted);
                let shown = ctx.log.number(identity.number());
                let span = info_span!("call", call_id = %call.call_id, caller = %shown, verified = identity.is_verified());
                let (ctx, cancel) = (ctx.clone(), cancel.clone());
                // Each call sets itself up in its own task, so a slow answer (ringing) never
                // holds up the next caller.
                tracker.spawn(
                    async move {
                        if let Some(setup) = setup_call(&ctx, call, identity).await {
                            run_call(setup, ctx, cancel).await;
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
/// asserted to 911 ([`Call::start_bridge`]); a claimed one is still shown to operators and
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
async fn setup_call(
    ctx: &CallContext,
    call: IncomingCall,
    identity: CallerIdentity,
) -> Option<CallSetup> {
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
    let meta = CallMeta {
        call_id: call.call_id.clone(),
        caller: identity.number().to_owned(),
        identity,
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

/// The payload type we offer telephone-event (RFC 4733) at.
const TELEPHONE_EVENT_PT: u8 = 101;

/// After our 200 made the offer (a delayed-offer INVITE): wait for the ACK and read its
/// answer. `None` when the call ends instead (hung up, no ACK) or the answer is missing or
/// unusable; RFC 3261 §13.3.1.4 then has us end the call with BYE, as sent here.
async fn ack_answer(call: &mut IncomingCall) -> Option<(Negotiated, SocketAddr)> {
    loop {
        match call.events.recv().await? {
            DialogEvent::Confirmed { sdp } => {
                return match crate::dispatch::offer::leg_answer(&sdp) {
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
            DialogEvent::Bye | DialogEvent::Cancelled | DialogEvent::Timeout => {
                info!("the call ended before the ACK answered our offer");
                return None;
            }
            _ => {}
        }
    }
}

/// Why a call ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    CallerHungUp,
    Cancelled,
    MenuHungUp,
    NoMedia,
    MaxDuration,
    SignallingTimeout,
    Shutdown,
    /// Handed to 911 (REFER accepted or announced).
    Emergency,
    /// An admin hung the call up.
    Admin,
    /// The operator ended the bridged call.
    AgentHungUp,
}

/// Results of work done off the call's loop.
#[derive(Debug)]
enum Work {
    Engine(Input),
    /// The emergency audit row is durable (or could not be written: `None`).
    Audited(Option<i64>),
    /// A waiting caller's call-back ticket is durable (`true`) or could not be written.
    CallbackFiled(bool),
    /// Whether one of the number's daily call-backs was taken for this caller (`None`: the
    /// count could not be read or written).
    CallbackClaimed(Option<bool>, crate::callback::CallbackNumber),
}

/// A 911 redirect in progress.
#[derive(Debug)]
struct EmergencyRun {
    plan: VecDeque<EmergencyMethod>,
    current: Option<EmergencyMethod>,
    /// Where the next bridge attempts call (`emergency.uri`, then `backup_uris`, each name
    /// at each of its addresses once it is looked up), and where the current one called.
    bridge_targets: VecDeque<Route>,
    target: Option<Route>,
    audit: Option<Option<i64>>,
    /// "Connecting you to 911" has played (or was cut short by the 911 side answering).
    connecting_played: bool,
    /// The 911 side's early media offered while the notice plays: relayed once it has played.
    early_held: Option<(Negotiated, SocketAddr)>,
    deadline: Option<tokio::time::Instant>,
    refer_accepted: bool,
    announce_left: u32,
    failures: Vec<String>,
    /// The outcome has been recorded.
    finished: bool,
}

/// One way the 911 bridge calls: a configured route, and once its name is looked up, one of
/// the name's addresses.
///
/// A PSAP or carrier that names its gateway with several addresses (DNS A/AAAA records) is
/// reached at the next when one is down (RFC 3263 section 4.3: no response in time, a
/// transport error, or 503) before the bridge moves on to the backup routes. Each address is
/// one bridge attempt of the plan, with its own first-response deadline, so a dead first
/// address costs a 911 caller [`BRIDGE_FIRST_RESPONSE`], not the whole route.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    uri: String,
    /// The address this attempt calls; `None` until the name is looked up.
    at: Option<SocketAddr>,
    /// How many addresses the name had (1 for an IP literal or a name with one).
    of: usize,
}

impl Route {
    fn new(uri: String) -> Route {
        Route {
            uri,
            at: None,
            of: 1,
        }
    }
}

impl std::fmt::Display for Route {
    /// The URI, with the address when its name has several (the audit says which was down).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at {
            Some(a) if self.of > 1 => write!(f, "{} at {a}", self.uri),
            _ => f.write_str(&self.uri),
        }
    }
}

/// An outbound leg bridged to the caller (the 911 trunk).
struct Leg {
    handle: DialogHandle,
    /// Shared with the media clock, which relays it while bridged.
    port: Arc<RtpPort>,
    /// The operator this leg rings; `None` for the 911 leg.
    agent: Option<String>,
    /// The leg's own span, a child of the call's span.
    span: tracing::Span,
    /// Set once the leg answered: its codec and where its media goes.
    answered: Option<(Negotiated, SocketAddr)>,
    /// The 911 leg's early media (a 183 with SDP), relayed to the caller until it answers.
    early: Option<(Negotiated, SocketAddr)>,
    /// Our SDP on the leg (for answering its re-INVITEs and UPDATEs).
    sdp: LegSdp,
    /// The in-dialog OPTIONS asking a silent operator's phone whether it is still there.
    probe: Option<LegProbe>,
    /// Where the leg's media may come from: an operator's phone's SDP address or the address
    /// it registered from; for the 911 leg, anywhere.
    scope: LatchScope,
}

impl Leg {
    /// Where the caller's bridge goes now: the answer, else the 911 side's early media.
    fn media(&self) -> Option<(Negotiated, SocketAddr)> {
        self.answered.or(self.early)
    }

    /// The far end put the call on hold: it wants none of our media (we answered its offer
    /// recvonly or inactive).
    fn holds(&self) -> bool {
        self.answered.is_some_and(|(n, _)| !n.direction.sends())
    }
}

/// How the media clock should relay a bridge to a leg with media `neg` at `addr`:
/// - early media (`answered` false): our player (ringback) fills its silences;
/// - a leg that holds the call: our player (hold music) fills its silences, and no silence
///   watch, since a held phone may send nothing for as long as the hold lasts;
/// - an answered operator's phone: watched for `silence` (`limits.operator_silence_seconds`;
///   zero: not watched), since a phone that died sends no BYE;
/// - the answered 911 leg: relayed as it is, never cut for silence (a PSAP may be listening).
///
/// The leg's packets are taken from the sources `scope` admits.
pub(crate) fn leg_bridge(
    port: Arc<RtpPort>,
    (addr, scope): (SocketAddr, LatchScope),
    neg: Negotiated,
    answered: bool,
    operator: bool,
    silence: Duration,
) -> Bridge {
    let b = Bridge::new(port, addr, neg).latch_scope(scope);
    if !answered {
        b.filling(EARLY_MEDIA_GAP)
    } else if !neg.direction.sends() {
        b.filling(HOLD_FILL_GAP)
    } else if operator && !silence.is_zero() {
        b.watch_leg(silence)
    } else {
        b
    }
}

/// A caller in an operator queue.
#[derive(Debug)]
struct Queued {
    name: String,
    entered: Instant,
    menu_path: String,
    /// The agent being rung, and until when.
    ringing: Option<(String, tokio::time::Instant)>,
    /// The agent the caller is talking to.
    connected: Option<String>,
}

/// One call's driver state.
struct Call {
    ctx: CallContext,
    /// The menu and prompts this call started on (a reload does not change them).
    menu: Arc<ActiveMenu>,
    meta: CallMeta,
    handle: DialogHandle,
    engine: Engine,
    /// The call's media, paced by the shared [`MediaClock`].
    media: MediaHandle,
    local_media: SocketAddr,
    session_id: u64,
    version: u64,
    registry_id: u64,
    timer: Option<tokio::time::Instant>,
    /// The caller's recording file; the media clock meters and collects the samples.
    recorder: Option<Recorder>,
    /// Samples taken from the clock, reused between writes.
    recorded: Vec<i16>,
    work_tx: mpsc::Sender<Work>,
    emergency: Option<EmergencyRun>,
    leg: Option<Leg>,
    /// The leg's signalling events (apart from `leg` so both can be awaited at once).
    leg_events: Option<mpsc::Receiver<LegEvent>>,
    inputs: VecDeque<Input>,
    next_req: u64,
    end: Option<EndReason>,
    /// What the call achieved, for metrics: ticket, operator, emergency, info.
    outcome: Option<&'static str>,
    /// Waiting for (or talking to) an operator.
    queue: Option<Queued>,
    queue_events: Option<mpsc::Receiver<QueueEvent>>,
    /// Hang up (for this reason) once the prompts queued now have played.
    hangup_after_play: Option<EndReason>,
    /// Whether the media clock was last told to bridge the caller.
    /// The leg media the clock was last told to bridge to.
    bridged_shown: Option<((Negotiated, SocketAddr), bool)>,
    /// Keys pressed while waiting for an operator.
    queued_keys: VecDeque<char>,
    /// A waiting caller's call-back request is being taken: its number's daily count, then
    /// the call-back or its ticket (they stay in the queue until it is durable, and only
    /// then hear that they will be called back).
    callback_filing: bool,
    /// (language, state) last written to the registry.
    shown: (String, String),
    hangup: CancellationToken,
    /// Our 2xx to the caller's re-INVITE without SDP carried our offer: the ACK answers it.
    answer_in_ack: bool,
}

/// One call's task.
async fn run_call(setup: CallSetup, ctx: CallContext, cancel: CancellationToken) {
    let CallSetup {
        call,
        meta,
        port,
        media,
        local_media,
        session_id,
        registry_id,
    } = setup;
    let IncomingCall {
        handle, mut events, ..
    } = call;
    let menu = ctx.menu.get();
    let engine = Engine::new(menu.file.clone(), menu.main.clone());
    let no_media = Duration::from_secs(ctx.limits.no_media_seconds);
    let (media, mut notes) = ctx
        .clock
        .attach(port, media, no_media, tracing::Span::current());
    let hangup = ctx
        .registry
        .calls
        .get(&registry_id)
        .map(|c| c.hangup.clone())
        .unwrap_or_default();
    let (work_tx, mut work_rx) = mpsc::channel(16);
    let mut c = Call {
        ctx,
        menu,
        meta,
        handle,
        engine,
        media,
        local_media,
        session_id,
        version: 1,
        registry_id,
        timer: None,
        recorder: None,
        recorded: Vec::new(),
        work_tx,
        emergency: None,
        leg: None,
        leg_events: None,
        inputs: VecDeque::from([Input::Start]),
        next_req: 1,
        end: None,
        outcome: None,
        queue: None,
        queue_events: None,
        hangup_after_play: None,
        bridged_shown: None,
        queued_keys: VecDeque::new(),
        callback_filing: false,
        shown: (String::new(), String::new()),
        hangup,
        answer_in_ack: false,
    };
    let reason = c.run(&mut events, &mut notes, &mut work_rx, cancel).await;
    c.finish(reason).await;
}

impl Call {
    async fn run(
        &mut self,
        events: &mut mpsc::Receiver<DialogEvent>,
        notes: &mut mpsc::Receiver<MediaNote>,
        work_rx: &mut mpsc::Receiver<Work>,
        cancel: CancellationToken,
    ) -> EndReason {
        let max_call =
            tokio::time::Instant::now() + Duration::from_secs(self.ctx.limits.max_call_seconds);
        let mut closing = false;

        loop {
            // Let the menu react to everything that happened before waiting again (unless the
            // call is saying its last words).
            // Keys pressed while waiting come first: what they decide (1: leave the queue for
            // a ticket) is menu input, handled in this same pass rather than left until the
            // next event (which, for a caller on hold, may not come).
            while let Some(d) = self.queued_keys.pop_front() {
                self.on_queued_key(d).await;
            }
            if self.hangup_after_play.is_some() {
                self.inputs.clear();
            }
            while let Some(input) = self.inputs.pop_front() {
                let outputs = self.engine.handle(now(), input);
                for o in outputs {
                    self.carry_out(o).await;
                }
            }
            if let Some(r) = self.end {
                return r;
            }
            // Only touch the shared registry when what it shows changed (not per packet).
            if self.shown.0 != self.engine.language() || self.shown.1 != self.state_name() {
                self.shown = (
                    self.engine.language().to_owned(),
                    self.state_name().to_owned(),
                );
                self.ctx
                    .registry
                    .update(self.registry_id, &self.shown.0, &self.shown.1);
            }
            // Bridged to another leg: the media clock relays both ways, this task only
            // tells it when the bridge starts, moves (early media, then the answer from
            // elsewhere) and ends.
            let target = self
                .leg
                .as_ref()
                .and_then(|l| Some((l.media()?, l.answered.is_some())));
            if target != self.bridged_shown {
                self.bridged_shown = target;
                let silence = Duration::from_secs(self.ctx.limits.operator_silence_seconds);
                let bridge = self.leg.as_ref().and_then(|l| {
                    let ((neg, remote), answered) = target?;
                    Some(leg_bridge(
                        l.port.clone(),
                        (remote, l.scope),
                        neg,
                        answered,
                        l.agent.is_some(),
                        silence,
                    ))
                });
                self.media.lock().set_bridge(bridge);
            }

            let timer = self.timer;
            let ring_deadline = self
                .queue
                .as_ref()
                .and_then(|q| q.ringing.as_ref().map(|(_, at)| *at));
            let emergency_deadline = self.emergency.as_ref().and_then(|e| e.deadline);
            let probe_deadline = self.leg.as_ref().and_then(|l| Some(l.probe?.give_up_at));
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return EndReason::Shutdown,
                _ = self.hangup.cancelled() => {
                    info!("hung up by an admin");
                    return EndReason::Admin;
                }
                _ = self.ctx.closing.cancelled(), if !closing => {
                    closing = true;
                    if let Some(r) = self.say_goodbye() {
                        return r;
                    }
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { return EndReason::SignallingTimeout };
                    if let Some(r) = self.on_dialog_event(ev).await {
                        return r;
                    }
                }
                Some(note) = notes.recv() => match note {
                    MediaNote::Digit(d) => self.on_digit(d),
                    // A note from before a barge-in, or before more was queued, is stale.
                    MediaNote::PlayDone { stops } => {
                        let current = {
                            let st = self.media.lock();
                            !st.media.is_playing() && st.media.stops() == stops
                        };
                        if current {
                            self.on_play_done().await;
                        }
                    }
                    MediaNote::RecordingData => self.write_recorded(),
                    MediaNote::RecordingEnded => self.stop_recording().await,
                    MediaNote::NoMedia => {
                        info!(seconds = self.ctx.limits.no_media_seconds, "no media from the caller; hanging up");
                        return EndReason::NoMedia;
                    }
                    MediaNote::LegSilent => self.probe_operator_leg().await,
                },
                Some(w) = work_rx.recv() => match w {
                    Work::Engine(i) => self.inputs.push_back(i),
                    Work::CallbackFiled(ok) => self.callback_filed(ok).await,
                    Work::CallbackClaimed(claimed, number) => {
                        self.callback_claimed(claimed, number).await
                    }
                    Work::Audited(id) => {
                        if let Some(e) = &mut self.emergency {
                            e.audit = Some(id);
                        }
                        self.emergency_step().await;
                    }
                },
                qe = queue_event(&mut self.queue_events) => {
                    match qe {
                        Some(qe) => self.on_queue_event(qe).await,
                        None => self.queue_events = None,
                    }
                }
                _ = sleep_opt(ring_deadline) => {
                    if let Some(q) = &mut self.queue {
                        if let Some((agent, _)) = q.ringing.take() {
                            info!(%agent, "operator did not answer in time");
                            self.drop_agent_leg().await;
                            self.queue_offer_failed(&agent, OfferFailure::NoAnswer).await;
                        }
                    }
                }
                ev = leg_event(&mut self.leg_events) => {
                    if let Some(r) = self.on_leg_event(ev).await {
                        return r;
                    }
                }
                _ = sleep_opt(timer) => {
                    self.timer = None;
                    self.inputs.push_back(Input::Timeout);
                }
                _ = sleep_opt(probe_deadline) => {
                    // No answer to the OPTIONS in time: as good as its transaction's 408.
                    let span = self.leg.as_ref().map(|l| l.span.clone());
                    let span = span.unwrap_or_else(tracing::Span::current);
                    span.in_scope(|| info!(seconds = PROBE_ANSWER_WITHIN.as_secs(), "the operator's phone did not answer the OPTIONS"));
                    Box::pin(self.on_probe_answer(408)).instrument(span).await;
                    if let Some(r) = self.end.take() {
                        return r;
                    }
                }
                _ = sleep_opt(emergency_deadline) => {
                    if let Some(e) = &mut self.emergency {
                        e.deadline = None;
                    }
                    self.emergency_failed("no answer in time").await;
                }
                _ = tokio::time::sleep_until(max_call) => {
                    info!("call reached its maximum length; hanging up");
                    return EndReason::MaxDuration;
                }
            }
        }
    }

    /// Whether the caller is bridged to an answered leg (operator or 911).
    fn bridged(&self) -> bool {
        self.leg.as_ref().is_some_and(|l| l.answered.is_some())
    }

    /// The server is closing after its drain time: tell the caller, then hang up. A caller
    /// talking to an operator or 911 is not talked over: that call ends at the final stop.
    fn say_goodbye(&mut self) -> Option<EndReason> {
        if self.emergency.is_some() || self.bridged() {
            return None;
        }
        info!("server closing; saying goodbye");
        let p = self.prompts(&["shutdown_goodbye".into()]);
        let mut st = self.media.lock();
        st.media.stop();
        if p.is_empty() {
            return Some(EndReason::Shutdown);
        }
        st.media.play(p);
        drop(st);
        self.timer = None;
        self.hangup_after_play = Some(EndReason::Shutdown);
        None
    }

    /// What the admin view shows as the call's state (no allocation: this runs per packet).
    fn state_name(&self) -> &str {
        if self.emergency.is_some() {
            return "emergency";
        }
        if let Some(q) = &self.queue {
            return if q.connected.is_some() {
                "with operator"
            } else {
                "waiting for operator"
            };
        }
        if self.recorder.is_some() {
            return "recording";
        }
        self.engine.current_menu().unwrap_or("in menu")
    }

    fn on_digit(&mut self, d: char) {
        if self.emergency.is_some() {
            return; // a 911 redirect is not interrupted by keys
        }
        if self.hangup_after_play.is_some() {
            return; // the last words before hanging up are not interrupted either
        }
        if self.queue.is_some() {
            self.queued_keys.push_back(d);
            return;
        }
        self.inputs.push_back(Input::Digit(d));
    }

    async fn on_play_done(&mut self) {
        if self.leg.as_ref().is_some_and(Leg::holds) {
            // Hold music, looped, while the far end holds the call.
            let p = self.prompts(&["hold_music".into()]);
            self.media.lock().media.play(p);
            return;
        }
        if self.emergency.is_some() {
            self.emergency_played().await;
            return;
        }
        if let Some(r) = self.hangup_after_play {
            self.end = Some(r);
            return;
        }
        if let Some(q) = &self.queue {
            if q.connected.is_none() {
                // Hold music, looped, between announcements.
                let p = self.prompts(&["hold_music".into()]);
                self.media.lock().media.play(p);
            }
            return;
        }
        self.inputs.push_back(Input::PlayDone);
    }

    /// Carry out one engine output.
    async fn carry_out(&mut self, o: Output) {
        match o {
            Output::Play(names) => {
                let prompts = self.prompts(&names);
                let was_playing = self.media.lock().media.is_playing();
                self.media.lock().media.play(prompts);
                if !was_playing && !self.media.lock().media.is_playing() {
                    self.inputs.push_back(Input::PlayDone);
                }
            }
            Output::StopPlayback => self.media.lock().media.stop(),
            Output::Timer(d) => self.timer = d.map(|d| tokio::time::Instant::now() + d),
            Output::StartRecording { max, silence } => self.start_recording(max, silence),
            Output::StopRecording => self.stop_recording().await,
            Output::FileTicket(t) => {
                self.outcome = Some("ticket");
                self.file_ticket(t, true)
            }
            Output::LookupTicket(id) => {
                self.outcome.get_or_insert("info");
                let store = self.ctx.tickets.clone();
                let tx = self.work_tx.clone();
                self.ctx.tracker.spawn(
                    async move {
                        let r = match store.get(id).await {
                            Ok(Some(t)) => StatusResult::Found {
                                open: t.status == Status::Open,
                                days_since_update: (time::OffsetDateTime::now_utc()
                                    - t.updated_datetime)
                                    .whole_days()
                                    .clamp(0, u32::MAX as i64)
                                    as u32,
                            },
                            Ok(None) => StatusResult::NotFound,
                            Err(e) => {
                                warn!(error = %e, "status lookup failed");
                                StatusResult::Failed
                            }
                        };
                        let _ = tx.send(Work::Engine(Input::Status(r))).await;
                    }
                    .in_current_span(),
                );
            }
            Output::Emergency { reason, menu_path } => {
                self.outcome = Some("emergency");
                self.start_emergency(reason, menu_path)
            }
            Output::Queue {
                queue,
                skill,
                menu_path,
            } => {
                self.outcome.get_or_insert("operator");
                self.enter_queue(queue, skill, menu_path).await;
            }
            Output::Language(l) => info!(language = %l, "language chosen"),
            Output::Hangup => self.end = Some(EndReason::MenuHungUp),
        }
    }

    fn prompts(&self, names: &[String]) -> Vec<Arc<Prompt>> {
        let lang = self.engine.language();
        names
            .iter()
            .filter_map(|n| {
                let p = self
                    .menu
                    .prompts
                    .get(lang, n)
                    .or_else(|| self.menu.prompts.get(&self.ctx.default_language, n));
                if p.is_none() {
                    warn!(prompt = %n, language = %lang, "prompt missing; skipped");
                }
                p
            })
            .collect()
    }

    async fn on_dialog_event(&mut self, ev: DialogEvent) -> Option<EndReason> {
        match ev {
            DialogEvent::Confirmed { sdp } => {
                // The ACK: the caller is there, and our stream may start (if its media has
                // not started it already).
                self.media.lock().media.confirm();
                // Our 2xx to a re-INVITE without SDP carried our offer; this is the answer.
                if std::mem::take(&mut self.answer_in_ack) && !sdp.is_empty() {
                    match crate::dispatch::offer::leg_answer(&sdp) {
                        Ok((neg, addr)) => {
                            self.media.lock().media.renegotiate(neg, addr);
                            info!(direction = ?neg.direction, "media renegotiated (answer in ACK)");
                        }
                        Err(e) => {
                            warn!(error = %e, "unusable answer in the ACK; the media stays as it was")
                        }
                    }
                }
                None
            }
            DialogEvent::Cancelled => Some(EndReason::Cancelled),
            DialogEvent::Bye => Some(EndReason::CallerHungUp),
            DialogEvent::Timeout => Some(EndReason::SignallingTimeout),
            DialogEvent::Info { content_type, body } => {
                if let Some(d) = dtmf_info_digit(&content_type, &body) {
                    let repeat = {
                        let mut st = self.media.lock();
                        let repeat = st.media.on_info_key(d, std::time::Instant::now());
                        if !repeat {
                            st.media.stats.digits += 1;
                        }
                        repeat
                    };
                    if repeat {
                        debug!(digit = %d, "INFO repeats the key heard in the audio");
                    } else {
                        self.on_digit(d);
                    }
                }
                None
            }
            DialogEvent::Reoffer { txn, body, .. } => {
                self.version += 1;
                self.answer_in_ack = body.is_empty();
                let answer = reoffer(
                    &mut self.media.lock().media,
                    &body,
                    self.local_media,
                    self.session_id,
                    self.version,
                );
                match answer {
                    Ok(sdp) => {
                        self.handle
                            .answer_reoffer(
                                txn,
                                200,
                                Some(("application/sdp".into(), Bytes::from(sdp))),
                            )
                            .await
                    }
                    Err(e) => {
                        warn!(error = %e, "re-offer refused; 488 and the call goes on");
                        self.handle.answer_reoffer(txn, 488, None).await;
                    }
                }
                None
            }
            DialogEvent::RequestOutcome { method, code, .. } => {
                if method == Method::Refer {
                    self.on_refer_response(code).await;
                }
                self.end.take()
            }
            DialogEvent::Notify { event, body } => {
                if event.to_ascii_lowercase().starts_with("refer") {
                    self.on_refer_notify(&body).await;
                }
                self.end.take()
            }
        }
    }

    // ---- recording ---------------------------------------------------------------------

    fn start_recording(&mut self, max: Duration, silence: Duration) {
        let name = format!(
            "{}-{:08x}.wav",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            rand::random::<u32>()
        );
        let path = self.ctx.recordings.join(name);
        let t = now();
        match Recorder::create(&path, t, max, silence) {
            Ok(r) => {
                info!(path = %path.display(), "recording");
                self.recorder = Some(r);
                self.media
                    .lock()
                    .start_recording(VoiceMeter::new(t, max, silence));
            }
            Err(e) => {
                // Cannot record: file the ticket without a description rather than lose it.
                error!(error = %e, "cannot record; continuing without a description");
                self.inputs.push_back(Input::Recorded { media_url: None });
            }
        }
    }

    /// Write what the media clock recorded since the last time (here, not on the clock's
    /// thread: file IO must not delay packets).
    fn write_recorded(&mut self) {
        let Some(rec) = &mut self.recorder else {
            return;
        };
        self.media.lock().take_recorded(&mut self.recorded);
        rec.write(&self.recorded);
        self.recorded.clear();
    }

    /// Close the recording; returns the file name (in the recordings directory) of what was
    /// kept.
    fn close_recording(&mut self) -> Option<String> {
        let mut rec = self.recorder.take()?;
        self.media.lock().stop_recording(&mut self.recorded);
        rec.write(&self.recorded);
        self.recorded.clear();
        let secs = rec.seconds();
        match rec.finish() {
            Ok(Some(path)) => {
                info!(seconds = secs, "recording kept");
                path.file_name().map(|n| n.to_string_lossy().into_owned())
            }
            Ok(None) => None,
            Err(e) => {
                error!(error = %e, "recording could not be finished");
                None
            }
        }
    }

    async fn stop_recording(&mut self) {
        if self.recorder.is_none() {
            return;
        }
        let media_url = self.close_recording();
        self.inputs.push_back(Input::Recorded { media_url });
    }

    // ---- tickets -----------------------------------------------------------------------

    /// Commit a ticket off the loop; report to the engine when `report` (not after hang-up).
    fn file_ticket(&mut self, t: TicketRequest, report: bool) {
        let new = NewTicket {
            service_code: t.service_code.clone(),
            service_name: t.service_name.clone(),
            description: t.description.clone(),
            agency_responsible: t.agency.clone(),
            zipcode: t.field("zipcode").map(str::to_owned),
            address_id: t.field("address").map(str::to_owned),
            phone: Some(self.meta.caller.clone()),
            recording: t.media_url.clone(),
            channel: Channel::Phone,
            language: Some(t.language.clone()),
            call_id: Some(self.meta.call_id.clone()),
            ..NewTicket::default()
        };
        let store = self.ctx.tickets.clone();
        let tx = self.work_tx.clone();
        let service = t.service_code;
        let fut = async move {
            let input = match store.file(new).await {
                Ok(ticket) => {
                    info!(id = ticket.service_request_id, %service, "ticket filed");
                    Input::TicketFiled {
                        id: ticket.service_request_id,
                    }
                }
                Err(e) => {
                    error!(error = %e, %service, "ticket could not be filed");
                    Input::TicketFailed
                }
            };
            if report {
                let _ = tx.send(Work::Engine(input)).await;
            }
        }
        .in_current_span();
        // On the server's tracker, so shutdown waits for it and no ticket is lost.
        self.ctx.tracker.spawn(fut);
    }

    // ---- 911 ---------------------------------------------------------------------------

    fn start_emergency(&mut self, reason: Option<String>, menu_path: String) {
        let plan: VecDeque<EmergencyMethod> = self.ctx.emergency.plan().into();
        warn!(?reason, %menu_path, plan = ?plan, "redirecting caller to 911");
        self.timer = None;
        let connecting = self.prompts(&["connecting_911".into()]);
        {
            let mut st = self.media.lock();
            st.media.stop();
            st.media.play(connecting);
        }
        // What was recorded is kept (the file), but nothing more is.
        let _ = self.close_recording();
        let method = plan.front().copied().unwrap_or(EmergencyMethod::Announce);
        self.emergency = Some(EmergencyRun {
            plan,
            current: None,
            bridge_targets: (self.ctx.emergency.bridge_targets().into_iter())
                .map(Route::new)
                .collect(),
            target: None,
            audit: None,
            connecting_played: false,
            early_held: None,
            deadline: None,
            refer_accepted: false,
            announce_left: self.ctx.emergency.announce_repeats.max(1),
            failures: vec![],
            finished: false,
        });
        let store = self.ctx.tickets.clone();
        let tx = self.work_tx.clone();
        let audit = EmergencyAudit {
            caller: Some(self.meta.caller.clone()),
            call_id: self.meta.call_id.clone(),
            menu_path,
            reason,
            method: method.as_str().to_owned(),
            caller_verified: self.meta.identity.is_verified(),
        };
        self.ctx.tracker.spawn(
            async move {
                let id = match store.audit_emergency_start(&audit).await {
                    Ok(id) => Some(id),
                    Err(e) => {
                        error!(error = %e, "911 audit row could not be written; redirecting anyway");
                        None
                    }
                };
                let _ = tx.send(Work::Audited(id)).await;
            }
            .in_current_span(),
        );
    }

    async fn emergency_played(&mut self) {
        let Some(e) = &mut self.emergency else { return };
        let notice_ended = !std::mem::replace(&mut e.connecting_played, true);
        match e.current {
            None => self.emergency_step().await,
            Some(EmergencyMethod::Announce) => {
                e.announce_left = e.announce_left.saturating_sub(1);
                if e.announce_left > 0 {
                    let p = self.prompts(&["emergency_announce".into()]);
                    self.media.lock().media.play(p);
                } else {
                    self.emergency_done("announced");
                    self.end = Some(EndReason::Emergency);
                }
            }
            // The 911 leg rings on: so does the caller's line (see `prompt::ringback`), or the
            // caller hears the early media the 911 side offered while the notice played.
            Some(EmergencyMethod::Bridge) => {
                let held = if notice_ended {
                    e.early_held.take()
                } else {
                    None
                };
                if let Some(l) = self.leg.as_mut().filter(|l| l.answered.is_none()) {
                    if let Some(media) = held {
                        info!(codec = ?media.0.codec, "911 side's early media relayed to the caller");
                        l.early = Some(media);
                    }
                    self.media.lock().media.play(vec![ringback()]);
                }
            }
            Some(EmergencyMethod::Refer) => {}
        }
    }

    /// Start the next method once the audit is durable: a bridge at once (its INVITE goes out
    /// while "connecting you to 911" plays), a REFER or the announcement once the notice has
    /// played (a REFER takes the caller's phone out of the call, so the notice comes first).
    async fn emergency_step(&mut self) {
        let Some(e) = &mut self.emergency else { return };
        let next = e.plan.front().copied().unwrap_or(EmergencyMethod::Announce);
        let waits_for_notice = next != EmergencyMethod::Bridge;
        if e.current.is_some() || e.audit.is_none() || (waits_for_notice && !e.connecting_played) {
            return;
        }
        let notice_played = e.connecting_played;
        let method = e.plan.pop_front().unwrap_or(EmergencyMethod::Announce);
        e.current = Some(method);
        let timeout = Duration::from_secs(self.ctx.emergency.timeout_seconds);
        match method {
            EmergencyMethod::Refer => {
                let uri = self.ctx.emergency.uri.clone().unwrap_or_default();
                e.deadline = Some(tokio::time::Instant::now() + timeout);
                info!(%uri, "REFER to 911");
                let req = self.next_req;
                self.next_req += 1;
                self.handle
                    .request(
                        req,
                        Method::Refer,
                        vec![
                            ("Refer-To".into(), format!("<{uri}>")),
                            (
                                "Referred-By".into(),
                                format!("<sip:311@{}>", self.local_media.ip()),
                            ),
                        ],
                        None,
                    )
                    .await;
            }
            EmergencyMethod::Bridge => {
                // A healthy trunk rings or answers within moments; one that says nothing for
                // a few seconds is down, and the caller must not wait on it.
                e.deadline = Some(tokio::time::Instant::now() + BRIDGE_FIRST_RESPONSE.min(timeout));
                match self.start_bridge().await {
                    // From the INVITE on, the caller hears ringing until 911 answers (after
                    // the notice, if it is still playing: see `emergency_played`).
                    Ok(()) if notice_played => self.media.lock().media.play(vec![ringback()]),
                    Ok(()) => {}
                    Err(why) => Box::pin(self.emergency_failed(&why)).await,
                }
            }
            EmergencyMethod::Announce => {
                info!("announcing: hang up and dial 911");
                let p = self.prompts(&["emergency_announce".into()]);
                self.media.lock().media.play(p);
            }
        }
    }

    /// Call the next 911 route. A caller whose number a trusted trunk asserted
    /// ([`CallerIdentity::Asserted`]) is presented with it in From and P-Asserted-Identity,
    /// which 911 location lookup keys on. A caller whose number is only claimed is not: the
    /// leg carries no P-Asserted-Identity and From is the line's own number
    /// (`callback.from_user`), so the 911 side sees the city's trunk, as for any call it
    /// cannot verify, and a forged number cannot send responders to someone else's address.
    /// Either way the caller is connected.
    async fn start_bridge(&mut self) -> Result<(), String> {
        let mut route = self
            .emergency
            .as_mut()
            .and_then(|e| e.bridge_targets.pop_front())
            .ok_or_else(|| "no route left".to_owned())?;
        if let Some(e) = &mut self.emergency {
            e.target = Some(route.clone());
        }
        let port = self
            .ctx
            .ports
            .allocate()
            .ok_or_else(|| "no RTP port free".to_owned())?;
        let destination = match route.at {
            Some(a) => Ok(a),
            None => {
                let found = self.ctx.outbound.destinations(&route.uri).await;
                found.map(|all| self.fan_out(&mut route, &all))
            }
        };
        let uri = route.uri;
        let ip = leg_media_ip(
            self.local_media.ip(),
            &port,
            destination.as_ref().ok().map(|a| a.ip()),
        );
        let sdp = LegSdp::new(SocketAddr::new(ip, port.port));
        let offer = sdp.offer(self.media.lock().media.codec());
        let mut headers = vec![
            ("X-311-Call-ID".to_owned(), self.meta.call_id.clone()),
            (
                "X-311-Language".to_owned(),
                self.engine.language().to_owned(),
            ),
        ];
        let caller = match self.meta.identity.asserted() {
            Some(number) => {
                headers.insert(0, asserted_identity(number, ip));
                number.to_owned()
            }
            None => {
                info!("the caller's number is not verified: 911 is not told it");
                self.ctx.callback.from_user.clone()
            }
        };
        info!(%uri, "bridging the caller to 911");
        let call = self
            .ctx
            .outbound
            .invite_to(
                &uri,
                destination,
                &caller,
                Some("311 caller"),
                headers,
                Bytes::from(offer),
            )
            .await;
        self.leg = Some(Leg {
            handle: call.handle,
            sdp,
            probe: None,
            // A PSAP's audio is never refused for where it comes from.
            scope: LatchScope::Anywhere,
            port: Arc::new(port),
            agent: None,
            span: tracing::info_span!("emergency_leg", %uri),
            answered: None,
            early: None,
        });
        self.leg_events = Some(call.events);
        Ok(())
    }

    /// `route`'s name has the addresses `all`: this attempt calls the first, and each other
    /// becomes an attempt of its own, next in line (before the backup routes).
    fn fan_out(&mut self, route: &mut Route, all: &[SocketAddr]) -> SocketAddr {
        route.at = Some(all[0]);
        route.of = all.len();
        if let Some(e) = &mut self.emergency {
            e.target = Some(route.clone());
            for &a in all[1..].iter().rev() {
                let next = Route {
                    at: Some(a),
                    ..route.clone()
                };
                e.bridge_targets.push_front(next);
                e.plan.push_front(EmergencyMethod::Bridge);
            }
            if all.len() > 1 {
                info!(uri = %route.uri, addresses = ?all, "911 route has several addresses; the next is tried if one is down");
            }
        }
        all[0]
    }

    /// The current 911 route answered for itself (a final response other than 408 or 503,
    /// RFC 3263 section 4.3): its name's other addresses would say the same, so they are not
    /// tried; the backup routes still are.
    fn skip_other_addresses(&mut self) {
        let Some(e) = &mut self.emergency else { return };
        let Some(uri) = e.target.as_ref().map(|r| r.uri.clone()) else {
            return;
        };
        while e
            .bridge_targets
            .front()
            .is_some_and(|r| r.uri == uri && r.at.is_some())
        {
            e.bridge_targets.pop_front();
            if let Some(i) = e.plan.iter().position(|m| *m == EmergencyMethod::Bridge) {
                e.plan.remove(i);
            }
        }
    }

    async fn on_leg_event(&mut self, ev: Option<LegEvent>) -> Option<EndReason> {
        if let Some(LegEvent::Dialog(DialogEvent::RequestOutcome { req, code, .. })) = &ev {
            if self
                .leg
                .as_ref()
                .is_some_and(|l| l.probe.is_some_and(|p| p.req == *req))
            {
                let span = self.leg.as_ref().map(|l| l.span.clone());
                let span = span.unwrap_or_else(tracing::Span::current);
                Box::pin(self.on_probe_answer(*code)).instrument(span).await;
                return self.end.take();
            }
        }
        if let Some(LegEvent::Dialog(DialogEvent::Reoffer {
            txn, method, body, ..
        })) = &ev
        {
            let span = self.leg.as_ref().map(|l| l.span.clone());
            let span = span.unwrap_or_else(tracing::Span::current);
            Box::pin(self.on_leg_reoffer(*txn, method, body))
                .instrument(span)
                .await;
            return self.end.take();
        }
        if let Some(LegEvent::Dialog(DialogEvent::Confirmed { sdp })) = &ev {
            let span = self.leg.as_ref().map(|l| l.span.clone());
            let span = span.unwrap_or_else(tracing::Span::current);
            span.in_scope(|| self.on_leg_ack(sdp));
            return None;
        }
        if let Some(l) = self.leg.as_ref().filter(|l| l.agent.is_some()) {
            // Everything about the operator leg logs in its own span, under the call's.
            let span = l.span.clone();
            return Box::pin(self.on_agent_leg_event(ev)).instrument(span).await;
        }
        let Some(ev) = ev else {
            self.leg = None;
            self.leg_events = None;
            return None;
        };
        match ev {
            LegEvent::Provisional { code, sdp } => {
                debug!(code, early_media = sdp.is_some(), "911 leg ringing");
                // The address answers: it is up, and its name's other addresses are not needed
                // (whatever it says next, RFC 3263 section 4.3).
                self.skip_other_addresses();
                let timeout = Duration::from_secs(self.ctx.emergency.timeout_seconds);
                if let Some(e) = &mut self.emergency {
                    e.deadline = Some(tokio::time::Instant::now() + timeout);
                }
                // Early media (RFC 3960): what the 911 side plays before it answers (its
                // ringback, "all lines are busy, stay on the line") is what the caller must
                // hear, in place of our own ringback, which fills in while it sends nothing
                // (see `Bridge::filling`).
                let early = sdp.and_then(|b| crate::dispatch::offer::leg_answer(&b).ok());
                let notice_playing = self
                    .emergency
                    .as_ref()
                    .is_some_and(|e| !e.connecting_played);
                if let (Some(l), Some(media)) = (&mut self.leg, early) {
                    if notice_playing {
                        // "Connecting you to 911" is heard to its end first.
                        debug!(codec = ?media.0.codec, "911 side offers early media; relayed once the notice has played");
                        if let Some(e) = &mut self.emergency {
                            e.early_held = Some(media);
                        }
                    } else if l.answered.is_none() && l.early != Some(media) {
                        info!(codec = ?media.0.codec, "911 side offers early media; relayed to the caller");
                        l.early = Some(media);
                    }
                }
            }
            LegEvent::Answered { sdp: body } => {
                let parsed = crate::dispatch::offer::leg_answer(&body);
                match parsed {
                    Ok((neg, addr)) => {
                        info!(codec = ?neg.codec, "911 answered; caller bridged");
                        if let Some(l) = &mut self.leg {
                            l.answered = Some((neg, addr));
                        }
                        self.media.lock().media.stop();
                        if let Some(e) = &mut self.emergency {
                            e.deadline = None;
                        }
                        self.emergency_done("connected");
                    }
                    Err(e) => {
                        if let Some(l) = self.leg.take() {
                            l.handle.hangup().await;
                        }
                        self.emergency_failed(&format!("unusable answer: {e}"))
                            .await;
                    }
                }
            }
            LegEvent::Failed { code, reason } => {
                self.leg = None;
                if !matches!(code, 408 | 503) {
                    self.skip_other_addresses();
                }
                self.emergency_failed(&format!("answered {code} {reason}"))
                    .await;
            }
            LegEvent::Dialog(DialogEvent::Bye) => {
                info!("911 side hung up");
                self.leg = None;
                return Some(EndReason::Emergency);
            }
            LegEvent::Dialog(_) => {}
        }
        self.end.take()
    }

    async fn on_refer_response(&mut self, code: u16) {
        let Some(e) = &mut self.emergency else { return };
        if e.current != Some(EmergencyMethod::Refer) {
            return;
        }
        if (200..300).contains(&code) {
            e.refer_accepted = true;
            info!(code, "REFER accepted; waiting for the transfer's outcome");
        } else {
            Box::pin(self.emergency_failed(&format!("REFER answered {code}"))).await;
        }
    }

    async fn on_refer_notify(&mut self, body: &[u8]) {
        let Some(e) = &mut self.emergency else { return };
        if e.current != Some(EmergencyMethod::Refer) {
            return;
        }
        // message/sipfrag: "SIP/2.0 200 OK"
        let text = String::from_utf8_lossy(body);
        let code: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        match code {
            100..=199 => debug!(code, "911 transfer in progress"),
            200..=299 => {
                info!("caller transferred to 911");
                self.emergency_done("connected");
                self.end = Some(EndReason::Emergency);
            }
            _ => {
                Box::pin(self.emergency_failed(&format!("transfer failed: {}", text.trim()))).await
            }
        }
    }

    async fn emergency_failed(&mut self, why: &str) {
        if let Some(l) = self.leg.take() {
            if l.answered.is_none() {
                l.handle.hangup().await; // CANCEL a leg still ringing
            }
        }
        // Ringback for a leg that failed stops; the next method brings its own sound. The
        // notice, if it is still playing (a route that failed at once), is heard to its end.
        if self.emergency.as_ref().is_none_or(|e| e.connecting_played) {
            self.media.lock().media.stop();
        }
        let Some(e) = &mut self.emergency else { return };
        e.early_held = None;
        warn!(method = ?e.current, target = ?e.target.as_ref().map(Route::to_string), reason = why, "911 method failed; trying the next");
        let method = e.current.map_or("?", |m| m.as_str());
        e.failures.push(match (e.current, e.target.take()) {
            (Some(EmergencyMethod::Bridge), Some(to)) => format!("{method} to {to}: {why}"),
            _ => format!("{method}: {why}"),
        });
        e.current = None;
        e.deadline = None;
        e.refer_accepted = false;
        Box::pin(self.emergency_step()).await;
    }

    fn emergency_done(&mut self, outcome: &str) {
        let Some(e) = &mut self.emergency else { return };
        if e.finished {
            return;
        }
        e.finished = true;
        let e = &*e;
        let method = e
            .current
            .or(e.plan.front().copied())
            .map_or("announce", |m| m.as_str());
        self.ctx.metrics.add(
            "ivr311_emergency_redirects_total",
            "Callers redirected to 911, by method and outcome.",
            &[("method", method), ("outcome", outcome)],
            1,
        );
        let mut outcome = format!("{outcome} via {method}");
        if !e.failures.is_empty() {
            outcome.push_str(&format!(" after {}", e.failures.join("; ")));
        }
        if let Some(Some(id)) = e.audit {
            let store = self.ctx.tickets.clone();
            self.ctx.tracker.spawn(async move {
                if let Err(err) = store.audit_emergency_outcome(id, &outcome).await {
                    error!(error = %err, "911 audit outcome not written");
                }
            });
        }
    }

    // ---- operators -------------------------------------------------------------------

    async fn enter_queue(&mut self, queue: String, skill: Option<String>, menu_path: String) {
        let Some(q) = self.ctx.queues.clone() else {
            info!(%queue, "operator requested; no operators are configured");
            self.inputs.push_back(Input::QueueUnavailable);
            return;
        };
        let (tx, rx) = mpsc::channel(16);
        // Callers are matched to operators who speak their language unless the menu says otherwise.
        let skill = skill.or_else(|| Some(self.engine.language().to_owned()));
        match q.enqueue(self.registry_id, &queue, skill, 0, tx).await {
            Ok(pos) => {
                info!(%queue, place = pos.place, ewt = pos.ewt.as_secs(), "waiting for an operator");
                self.queue = Some(Queued {
                    name: queue,
                    entered: now(),
                    menu_path,
                    ringing: None,
                    connected: None,
                });
                self.queue_events = Some(rx);
                let mut p = vec!["operator_queue".to_owned()];
                p.extend(position_prompts(self.engine.language(), pos));
                let p = self.prompts(&p);
                self.media.lock().media.play(p);
            }
            Err(why) => {
                info!(%queue, reason = %why, "no operator can take the call now");
                self.inputs.push_back(Input::QueueUnavailable);
            }
        }
    }

    async fn on_queue_event(&mut self, ev: QueueEvent) {
        match ev {
            QueueEvent::Offer {
                agent,
                ring_timeout,
            } => self.offer_agent(agent, ring_timeout).await,
            QueueEvent::CancelOffer { agent } => {
                let ringing_this = self.leg.as_ref().is_some_and(|l| {
                    l.agent.as_deref() == Some(agent.as_str()) && l.answered.is_none()
                });
                if ringing_this {
                    self.drop_agent_leg().await;
                    if let Some(q) = &mut self.queue {
                        q.ringing = None;
                    }
                }
            }
            QueueEvent::Announce(pos) => {
                if self.queue.as_ref().is_some_and(|q| q.connected.is_none()) {
                    self.media.lock().media.stop();
                    let p = self.prompts(&position_prompts(self.engine.language(), pos));
                    self.media.lock().media.play(p);
                }
            }
            QueueEvent::MaxWait => {
                info!("waited the longest allowed; offering a ticket instead");
                self.leave_queue().await;
                self.inputs.push_back(Input::QueueUnavailable);
            }
        }
    }

    /// Keys pressed while waiting: 1 leaves the queue for a ticket, 2 asks for a call back,
    /// 9 is still 911.
    async fn on_queued_key(&mut self, d: char) {
        if self.queue.as_ref().is_some_and(|q| q.connected.is_some()) {
            return; // talking to an operator: keys were relayed to them
        }
        match d {
            '1' => {
                info!("caller left the queue to file a ticket");
                self.leave_queue().await;
                self.media.lock().media.stop();
                self.inputs.push_back(Input::QueueUnavailable);
            }
            '2' => {
                info!("caller asked for a call back");
                if self.callback_filing {
                    return; // pressed again while the first request is being taken
                }
                // Only a number a trusted trunk asserted, of a kind the city calls, and not
                // past its call-backs for the day: anything else would have the city's trunk
                // (or its staff) dial whatever a caller wrote in From.
                let number = match self.ctx.callback.callback_number(&self.meta.identity) {
                    Ok(n) => n,
                    Err(why) => {
                        self.callback_unavailable(why);
                        return;
                    }
                };
                self.callback_filing = true;
                let store = self.ctx.tickets.clone();
                let tx = self.work_tx.clone();
                let (call_id, per_day) = (
                    self.meta.call_id.clone(),
                    self.ctx.callback.per_number_per_day,
                );
                self.ctx.tracker.spawn(
                    async move {
                        let claimed = store.claim_callback(&number.e164, &call_id, per_day).await;
                        let _ = tx.send(Work::CallbackClaimed(claimed.ok(), number)).await;
                    }
                    .in_current_span(),
                );
            }
            '9' => {
                self.leave_queue().await;
                let path = format!("{} > queue:9", self.engine.menu_path());
                self.outcome = Some("emergency");
                self.start_emergency(Some("caller pressed 9 while waiting".into()), path);
            }
            _ => {}
        }
    }

    /// Ring an operator's phone with the caller's number and context.
    async fn offer_agent(&mut self, agent: String, ring_timeout: Duration) {
        let Some((contact, flow)) = self
            .ctx
            .agent_contacts
            .get(&agent)
            .map(|c| c.value().clone())
        else {
            warn!(%agent, "offered an operator who has no registered phone");
            self.queue_offer_failed(&agent, OfferFailure::Unreachable)
                .await;
            return;
        };
        let Some(port) = self.ctx.ports.allocate() else {
            warn!("no RTP port for the operator leg");
            self.queue_offer_failed(&agent, OfferFailure::Unreachable)
                .await;
            return;
        };
        let ip = leg_media_ip(self.local_media.ip(), &port, Some(flow.remote.ip()));
        let scope = LatchScope::SdpOr(flow.remote.ip());
        let sdp = LegSdp::new(SocketAddr::new(ip, port.port));
        let offer = sdp.offer(self.media.lock().media.codec());
        let Some(q) = &self.queue else { return };
        let caller = self.meta.caller.clone();
        let headers = OperatorOffer {
            number: &caller,
            host: ip,
            language: self.engine.language(),
            menu_path: &q.menu_path,
            queue: &q.name,
            waited: q.entered.elapsed().as_secs(),
            call_id: &self.meta.call_id,
            callback: false,
        }
        .headers();
        let span = tracing::info_span!("agent_leg", %agent);
        span.in_scope(|| info!(%contact, "offering the call to an operator"));
        let call = self
            .ctx
            .outbound
            .invite_via(
                &contact,
                flow,
                &caller,
                Some("311 caller"),
                headers,
                Bytes::from(offer),
            )
            .instrument(span.clone())
            .await;
        self.leg = Some(Leg {
            handle: call.handle,
            sdp,
            probe: None,
            scope,
            port: Arc::new(port),
            agent: Some(agent.clone()),
            span,
            answered: None,
            early: None,
        });
        self.leg_events = Some(call.events);
        if let Some(q) = &mut self.queue {
            q.ringing = Some((agent, tokio::time::Instant::now() + ring_timeout));
        }
    }

    async fn on_agent_leg_event(&mut self, ev: Option<LegEvent>) -> Option<EndReason> {
        let agent = self
            .leg
            .as_ref()
            .and_then(|l| l.agent.clone())
            .unwrap_or_default();
        let Some(ev) = ev else {
            self.leg = None;
            self.leg_events = None;
            return None;
        };
        match agent_leg_step(&agent, ev) {
            AgentLegStep::Nothing => {}
            AgentLegStep::Answered(neg, addr) => {
                if let Some(l) = &mut self.leg {
                    l.answered = Some((neg, addr));
                }
                self.media.lock().media.stop();
                if let Some(q) = &mut self.queue {
                    q.ringing = None;
                    q.connected = Some(agent.clone());
                }
                if let Some(q) = &self.ctx.queues {
                    q.offer_answered(self.registry_id, &agent).await;
                }
            }
            AgentLegStep::Unusable => {
                self.drop_agent_leg().await;
                self.queue_offer_failed(&agent, OfferFailure::NoCommonCodec)
                    .await;
            }
            AgentLegStep::Failed(why) => {
                self.leg = None;
                self.leg_events = None;
                if let Some(q) = &mut self.queue {
                    q.ringing = None;
                }
                self.queue_offer_failed(&agent, why).await;
            }
            AgentLegStep::HungUp => {
                self.leg = None;
                self.leg_events = None;
                return Some(EndReason::AgentHungUp);
            }
        }
        self.end.take()
    }

    async fn queue_offer_failed(&mut self, agent: &str, why: OfferFailure) {
        if let Some(q) = &self.ctx.queues {
            q.offer_failed(self.registry_id, agent, why).await;
        }
        // Back to hold music while the next operator is tried.
        if !self.media.lock().media.is_playing() {
            let p = self.prompts(&["hold_music".into()]);
            self.media.lock().media.play(p);
        }
    }

    /// Hang up (or CANCEL) the operator leg, if any.
    async fn drop_agent_leg(&mut self) {
        if let Some(l) = self.leg.take() {
            l.handle.hangup().await;
            l.handle.release();
        }
        self.leg_events = None;
    }

    /// The operator's phone sent nothing for `limits.operator_silence_seconds` while bridged. Either
    /// it crashed or lost its network without a BYE, or it suppresses silence and the
    /// operator is listening: ask it with an in-dialog OPTIONS before doing anything.
    async fn probe_operator_leg(&mut self) {
        let Some(l) = self
            .leg
            .as_mut()
            .filter(|l| l.agent.is_some() && l.probe.is_none())
        else {
            return;
        };
        let probe = LegProbe::new(tokio::time::Instant::now());
        l.probe = Some(probe);
        info!(
            seconds = self.ctx.limits.operator_silence_seconds,
            "no audio from the operator's phone; asking whether it is still there"
        );
        l.handle
            .request(probe.req, Method::Options, vec![], None)
            .await;
    }

    /// The silent operator's phone answered the OPTIONS (or did not in time: 408).
    async fn on_probe_answer(&mut self, code: u16) {
        if probe_says_gone(code) {
            self.operator_leg_silent(code).await;
            return;
        }
        if let Some(l) = &mut self.leg {
            l.probe = None;
        }
        info!(
            code,
            "the operator's phone is still there (silence suppression?); the bridge stays"
        );
        self.media.lock().rearm_leg_watch(std::time::Instant::now());
    }

    /// The operator's phone is gone (no audio, and no answer to OPTIONS, or 481): hang its
    /// leg up, free the operator, and give the caller what a caller with no operator gets (a
    /// ticket, or the menu again) rather than leave them in a silent bridge.
    async fn operator_leg_silent(&mut self, code: u16) {
        let Some(agent) = self.leg.as_ref().and_then(|l| l.agent.clone()) else {
            return;
        };
        warn!(
            %agent,
            seconds = self.ctx.limits.operator_silence_seconds,
            options = code,
            "the operator's phone is gone (no audio, OPTIONS failed); ending its leg"
        );
        self.drop_agent_leg().await;
        if let Some(q) = self.queue.take() {
            if let (Some(h), Some(a)) = (&self.ctx.queues, q.connected) {
                h.call_ended(&a).await;
            }
        }
        self.queue_events = None;
        self.media.lock().media.stop();
        self.inputs.push_back(Input::QueueUnavailable);
    }

    /// A re-INVITE or UPDATE from the leg's far end (an operator putting the caller on hold
    /// or taking them off it, a trunk refreshing the session or moving its media). Left
    /// unanswered, the phone would retransmit it for 32 s and then end the call.
    async fn on_leg_reoffer(&mut self, txn: u64, method: &Method, body: &[u8]) {
        let Some(l) = &mut self.leg else { return };
        let was_held = l.holds();
        let current = l.media().map_or(
            Negotiated {
                codec: Codec::Pcmu,
                payload_type: 0,
                telephone_event: Some(101),
                direction: crate::media::sdp::Direction::SendRecv,
            },
            |(n, _)| n,
        );
        let reoffer = l.sdp.reoffer(method, body, &current);
        if let LegReoffer::Answer { neg, addr, .. } = reoffer {
            if l.answered.is_some() {
                l.answered = Some((neg, addr));
            } else if l.agent.is_none() {
                // The 911 side's early media moved.
                l.early = Some((neg, addr));
            }
        }
        let (code, body) = reoffer.response();
        l.handle.answer_reoffer(txn, code, body).await;
        self.leg_hold_changed(was_held);
    }

    /// The ACK to our 2xx on the leg: if that 2xx carried our offer (a re-INVITE without SDP),
    /// the ACK's answer is the leg's media now.
    fn on_leg_ack(&mut self, body: &[u8]) {
        let Some(l) = &mut self.leg else { return };
        let was_held = l.holds();
        l.sdp.ack(body, &mut l.answered);
        self.leg_hold_changed(was_held);
    }

    /// After the leg's media changed: the caller hears hold music while the far end holds
    /// the call, and the far end again once it takes the call off hold.
    fn leg_hold_changed(&mut self, was_held: bool) {
        let held = self.leg.as_ref().is_some_and(Leg::holds);
        if held && !was_held {
            info!("the far end holds the call; the caller hears hold music");
            let p = self.prompts(&["hold_music".into()]);
            let mut m = self.media.lock();
            m.media.stop();
            m.media.play(p);
        } else if was_held && !held {
            info!("the far end took the call off hold");
            self.media.lock().media.stop();
        }
    }

    /// Leave the queue (caller's choice, max wait, or 911).
    async fn leave_queue(&mut self) {
        if let Some(q) = self.queue.take() {
            if q.ringing.is_some() || q.connected.is_none() {
                self.drop_agent_leg().await;
            }
            if let Some(h) = &self.ctx.queues {
                h.abandon(self.registry_id).await;
            }
        }
        self.queue_events = None;
    }

    /// The caller's number may be called back and the daily count was asked: keep their
    /// place for a call-back through the trunk, or (without a trunk, or when the place
    /// cannot be kept) file a ticket flagged for call-back.
    async fn callback_claimed(
        &mut self,
        claimed: Option<bool>,
        number: crate::callback::CallbackNumber,
    ) {
        let waiting = self.queue.as_ref().is_some_and(|q| q.connected.is_none());
        if !waiting {
            self.callback_filing = false;
            info!("the caller is no longer waiting; call-back request dropped");
            return;
        }
        match claimed {
            Some(true) => {}
            Some(false) => {
                self.callback_filing = false;
                self.callback_unavailable(crate::callback::Unavailable::DailyLimit);
                return;
            }
            None => {
                // The store said why in its own log line. Nothing was promised: the caller
                // hears the apology and keeps waiting (pressing 2 again tries again).
                self.callback_filing = false;
                let p = self.prompts(&["db_error".into(), "hold_music".into()]);
                let mut st = self.media.lock();
                st.media.stop();
                st.media.play(p);
                return;
            }
        }
        if let (Some(cb), Some(q)) = (self.ctx.callbacks.clone(), &self.queue) {
            let req = crate::callback::CallbackRequest {
                caller: self.registry_id,
                number: number.dial.clone(),
                call_id: self.meta.call_id.clone(),
                language: self.engine.language().to_owned(),
                menu_path: q.menu_path.clone(),
                queue: q.name.clone(),
                entered: q.entered,
                local_ip: self.local_media.ip(),
            };
            if q.ringing.is_some() {
                self.drop_agent_leg().await;
            }
            match cb.keep_place(req).await {
                Ok(()) => {
                    self.callback_filing = false;
                    // The place is the call-back's now: hang up without abandoning it.
                    (self.queue, self.queue_events) = (None, None);
                    let p = self.prompts(&["callback_kept".into()]);
                    {
                        let mut st = self.media.lock();
                        st.media.stop();
                        st.media.play(p);
                    }
                    self.hangup_after_play = Some(EndReason::MenuHungUp);
                    return;
                }
                Err(
                    why @ (crate::callback::NotKept::NotDialable
                    | crate::callback::NotKept::NotAllowed),
                ) => {
                    // Checked above against the same settings; never filed for staff either.
                    self.callback_filing = false;
                    warn!(reason = %why, "the call-back trunk refused a number the policy allowed");
                    self.callback_unavailable(crate::callback::Unavailable::NotAllowed);
                    return;
                }
                Err(why) => info!(reason = %why, "place not kept; filing a ticket"),
            }
        }
        // Without a call-back trunk, the request becomes a ticket flagged for call-back with
        // the caller's number, so an operator calls them. The caller keeps their place (and
        // hold music) until the ticket is durable: only then are they told they will be
        // called back ([`Call::callback_filed`]).
        self.file_callback_ticket(
            &number.dial,
            "Caller asked to be called back by an operator",
        );
    }

    /// The caller cannot be called back (`why`): they hear so, with the offer of a service
    /// request instead (1), and keep their place in the queue.
    fn callback_unavailable(&mut self, why: crate::callback::Unavailable) {
        info!(reason = %why, "no call-back for this line; a ticket is offered instead");
        let p = self.prompts(&["callback_unavailable".into()]);
        let mut st = self.media.lock();
        st.media.stop();
        st.media.play(p);
    }

    /// The call-back ticket of a waiting caller was written (or not). Saved: they leave the
    /// queue, hear that they will be called back, and are hung up. Not saved: they hear the
    /// apology and go on waiting for an operator (pressing 2 again tries again), so a request
    /// that was not stored is never confirmed.
    async fn callback_filed(&mut self, ok: bool) {
        self.callback_filing = false;
        if self.queue.as_ref().is_some_and(|q| q.connected.is_some()) {
            info!(
                saved = ok,
                "an operator answered while the call-back ticket was written"
            );
            return;
        }
        let mut prompts = vec![if ok { "callback_confirmed" } else { "db_error" }.to_owned()];
        if ok {
            self.leave_queue().await;
            self.hangup_after_play = Some(EndReason::MenuHungUp);
        } else if self.queue.is_some() {
            warn!("call-back ticket not saved; the caller keeps waiting");
            prompts.push("hold_music".to_owned());
        }
        let p = self.prompts(&prompts);
        let mut st = self.media.lock();
        st.media.stop();
        st.media.play(p);
    }

    /// A call-back request: a ticket flagged for call-back at `number`; the outcome comes
    /// back as [`Work::CallbackFiled`].
    fn file_callback_ticket(&mut self, number: &str, why: &str) {
        let new = crate::callback::flagged_ticket(
            why,
            number,
            self.engine.language(),
            &self.meta.call_id,
        );
        let store = self.ctx.tickets.clone();
        let tx = self.work_tx.clone();
        self.ctx.tracker.spawn(
            async move {
                let ok = crate::callback::file_flagged(&store, new).await;
                let _ = tx.send(Work::CallbackFiled(ok)).await;
            }
            .in_current_span(),
        );
    }

    // ---- the end -----------------------------------------------------------------------

    async fn finish(mut self, reason: EndReason) {
        // No more RTP to the caller: a phone that hung up has closed its port, which may
        // already be another program's.
        self.media.end();
        // A call that ended mid-ticket (the caller hung up, or we did: shutdown, time limit):
        // file what we have (the ZIP was given), so no report is lost.
        if matches!(
            reason,
            EndReason::CallerHungUp
                | EndReason::SignallingTimeout
                | EndReason::NoMedia
                | EndReason::Shutdown
                | EndReason::MaxDuration
        ) {
            let media_url = self.close_recording();
            if let Some(t) = self.engine.abandon(media_url) {
                info!("caller left mid-ticket; filing what was given");
                self.file_ticket(t, false);
            }
        }
        if let Some(e) = &self.emergency {
            if reason == EndReason::CallerHungUp {
                let outcome = if e.refer_accepted {
                    "caller left during transfer"
                } else {
                    "caller hung up"
                };
                self.emergency_done(outcome);
            }
        }
        if let Some(q) = self.queue.take() {
            if let Some(h) = &self.ctx.queues {
                match &q.connected {
                    Some(agent) => h.call_ended(agent).await,
                    None => h.abandon(self.registry_id).await,
                }
            }
        }
        if let Some(l) = self.leg.take() {
            l.handle.hangup().await;
            l.handle.release();
        }
        match reason {
            EndReason::CallerHungUp | EndReason::Cancelled | EndReason::SignallingTimeout => {}
            _ => self.handle.hangup().await,
        }
        self.handle.release();
        self.ctx.registry.remove(self.registry_id);
        let s = self.media.lock().media.stats;
        self.ctx
            .registry
            .rtp_in
            .fetch_add(s.packets_in, Ordering::Relaxed);
        self.ctx
            .registry
            .rtp_out
            .fetch_add(s.packets_out, Ordering::Relaxed);
        self.ctx
            .registry
            .digits
            .fetch_add(s.digits, Ordering::Relaxed);
        self.record_metrics(reason);
        info!(
            ?reason,
            menu_path = %self.engine.menu_path(),
            packets_in = s.packets_in,
            packets_out = s.packets_out,
            digits = s.digits,
            malformed_in = s.malformed_in,
            foreign_in = s.foreign_in,
            "call ended"
        );
    }
}

impl Call {
    fn record_metrics(&self, reason: EndReason) {
        let m = &self.ctx.metrics;
        let st = self.engine.stats();
        let outcome = self
            .outcome
            .or(st.heard_info.then_some("info"))
            .unwrap_or("abandoned");
        m.add(
            "ivr311_calls_total",
            "Finished calls by outcome.",
            &[("outcome", outcome)],
            1,
        );
        let reason = format!("{reason:?}");
        m.add(
            "ivr311_call_ends_total",
            "Finished calls by who ended them.",
            &[("reason", &reason)],
            1,
        );
        for menu in &st.menus {
            m.add(
                "ivr311_menu_visits_total",
                "Times callers entered each menu.",
                &[("menu", menu)],
                1,
            );
        }
        for (menu, n) in &st.invalid {
            m.add(
                "ivr311_dtmf_invalid_total",
                "Invalid keys pressed, by menu.",
                &[("menu", menu)],
                *n as u64,
            );
        }
        for (menu, n) in &st.timeouts {
            m.add(
                "ivr311_dtmf_timeouts_total",
                "Silent waits for a key, by menu.",
                &[("menu", menu)],
                *n as u64,
            );
        }
        let s = self.media.lock().media.stats;
        m.add(
            "ivr311_rtp_packets_received_total",
            "RTP packets received from callers.",
            &[],
            s.packets_in,
        );
        m.add(
            "ivr311_rtp_packets_sent_total",
            "RTP packets sent to callers.",
            &[],
            s.packets_out,
        );
        m.add(
            "ivr311_rtp_late_sends_total",
            "Packet times skipped because the media clock ran late.",
            &[],
            s.late_ticks,
        );
        m.add(
            "ivr311_dtmf_digits_total",
            "Keys heard (RFC 4733 and SIP INFO).",
            &[],
            s.digits,
        );
    }
}

/// "You are caller number twelve. Your estimated wait is about four minutes." and the options,
/// in `lang` (quantities read as numbers, see [`crate::menu::say`]).
fn position_prompts(lang: &str, pos: Position) -> Vec<String> {
    use crate::menu::say::{number, Gender};
    let mut p = vec!["queue_position".to_owned()];
    p.extend(number(lang, pos.place as u64, Gender::Counting));
    let minutes = pos.ewt.as_secs().div_ceil(60).max(1);
    if minutes == 1 {
        p.push("queue_wait_one".into());
    } else {
        p.push("queue_wait".into());
        p.extend(number(lang, minutes, Gender::Masculine));
        p.push("minutes".into());
    }
    p.push("queue_options".into());
    p
}

async fn queue_event(events: &mut Option<mpsc::Receiver<QueueEvent>>) -> Option<QueueEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn leg_event(events: &mut Option<mpsc::Receiver<LegEvent>>) -> Option<LegEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortRange;

    fn port_on(ip: &str) -> Option<RtpPort> {
        let probe = std::net::UdpSocket::bind((ip.parse::<IpAddr>().ok()?, 0)).ok()?;
        let p = probe.local_addr().ok()?.port() & !1;
        drop(probe);
        PortPool::new(PortRange { lo: p, hi: p + 8 }, ip.parse().ok()?).allocate()
    }

    /// A leg's media address follows the far end's family only where the port can use
    /// either (bound to `[::]`); the caller's own address is kept when the families match.
    #[test]
    fn a_legs_media_address_is_in_the_far_ends_family_on_a_dual_stack_port() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        let advertised: IpAddr = "203.0.113.7".parse().unwrap();
        let Some(any4) = port_on("0.0.0.0") else {
            return;
        };
        assert_eq!(leg_media_ip(advertised, &any4, Some(v4)), advertised);
        assert_eq!(leg_media_ip(advertised, &any4, None), advertised);
        // An IPv4-only port has no IPv6 address to offer.
        assert_eq!(leg_media_ip(advertised, &any4, Some(v6)), advertised);
        let Some(dual) = port_on("::") else {
            return eprintln!("no IPv6 here: the dual-stack case is not tested");
        };
        assert_eq!(leg_media_ip(v6, &dual, Some(v4)), v4);
        assert_eq!(leg_media_ip(v4, &dual, Some(v6)), v6);
        assert_eq!(leg_media_ip(v6, &dual, Some(v6)), v6);
    }
}
