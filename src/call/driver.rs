//! The call's driver: the thin async task around a [`CallCore`].
//!
//! It owns everything the core must not touch: the caller's [`DialogHandle`], the call's slot
//! on the media clock ([`MediaHandle`]), the legs' dialogs, RTP ports and event channels, the
//! queue's channel, the recording file, the timers and the tasks that write to the database.
//! It waits for whichever comes first (in a `select!`, in a fixed order: stop, admin hang-up,
//! the drain's end, the caller's dialog, media notes, work results, the queue, the legs, the
//! core's deadline), hands it to the core with `now`, and carries out the core's actions in
//! order. Work that takes a moment and that the core needs the answer to before anything else
//! (a leg's INVITE, the queue's answer, handing a place to a call-back) is awaited here and
//! its result fed straight back; database work runs in tasks on the server's tracker that
//! report back through a channel, so a slow disk never stalls the call, and a ticket whose
//! caller hung up is still filed.
//!
//! The driver does no per-packet work: while the caller is bridged the media clock relays
//! both legs' RTP itself ([`Bridge`]); the driver only tells it when the bridge starts, moves
//! and ends.

use super::core::{Action, CallCore, CallerMedia, CoreConfig, EndReason, Input, QueueCommand};
use super::facts::Facts;
use super::leg::{
    asserted_identity, BridgeTo, Dial, LegEnd, LegId, LegSdp, NotPlaced, PlaceLeg, Placed,
};
use super::menu_holder::MenuHolder;
use super::registry::CallCommand;
use super::setup::CallSetup;
use super::transfer::TransferId;
use super::CallRegistry;
use crate::config::Limits;
use crate::dispatch::emergency::EmergencyConfig;
use crate::dispatch::queue::{QueueEvent, QueueHandle};
use crate::dispatch::tickets::{Status, TicketStore};
use crate::media::clock::{Bridge, BrowserMedia, MediaClock, MediaHandle, MediaNote, SharedWebRtc};
use crate::media::dtmf::dtmf_info_digit;
use crate::media::ports::{PortPool, RtpPort};
use crate::media::record::{Recorder, VoiceMeter};
use crate::media::rtp::LatchScope;
use crate::media::sdp::Negotiated;
use crate::media::session::MediaStats;
use crate::media::webrtc::{DtlsIdentity, WebRtcLeg};
use crate::menu::engine::{self, StatusResult};
use crate::menu::say;
use crate::sip::transport::{Flow, Transport};
use crate::sip::ua::{DialogEvent, DialogHandle, IncomingCall, LegEvent, OutboundHandle};
use bytes::Bytes;
use dashmap::DashMap;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument, Span};

/// How long the 911 side's early media may fall silent before the caller hears our ringback
/// again. Longer than a pause in a spoken announcement; shorter than the time in which a
/// caller on a silent line decides it is dead.
const EARLY_MEDIA_GAP: Duration = Duration::from_secs(2);
/// How long a leg that holds the call may send nothing before the caller hears our hold
/// music (a phone that plays its own music on hold is heard instead).
const HOLD_FILL_GAP: Duration = Duration::from_millis(500);
/// Work results a call may have unread (they are few: each is one ticket, lookup or audit).
const WORK_QUEUE: usize = 16;
/// Commands (an admin's transfer) a call may have unread.
const COMMANDS: usize = 4;

/// The time now, on tokio's clock (paused in tests).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Our media address in the SDP offer of a leg (911, an operator's phone) whose far end is
/// at `towards`: `preferred`, the address the caller's media uses (the advertised one, or
/// the interface towards the caller), when it is of the far end's family. A server bound to
/// `[::]` serves IPv4 and IPv6 on one port, so a caller over IPv6 may be bridged to a PSAP or
/// phone reachable only over IPv4, which could never send to an IPv6 address: the leg then
/// offers the local address of the far end's family that routes to it. Otherwise (a port
/// bound to one family, nothing of the other to offer) `preferred` stays.
pub(crate) fn leg_media_ip(preferred: IpAddr, port: &RtpPort, towards: Option<IpAddr>) -> IpAddr {
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
pub(crate) struct CallContext {
    pub(crate) registry: Arc<CallRegistry>,
    pub(crate) ports: Arc<PortPool>,
    pub(crate) limits: Limits,
    pub(crate) advertise_ip: Option<IpAddr>,
    pub(crate) default_language: String,
    /// Ring (180) this long before answering; zero answers at once.
    pub(crate) answer_after: Duration,
    pub(crate) menu: Arc<MenuHolder>,
    pub(crate) tickets: TicketStore,
    pub(crate) emergency: EmergencyConfig,
    /// Places outbound legs (the 911 bridge).
    pub(crate) outbound: OutboundHandle,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Operator queues; `None` when no agents are configured.
    pub(crate) queues: Option<QueueHandle>,
    /// Call-backs that keep the caller's place; `None` without `callback.trunk_uri`.
    pub(crate) callbacks: Option<super::callback::Callbacks>,
    /// Where each logged-in agent's phone is reached.
    pub(crate) agent_contacts: Arc<DashMap<String, (String, crate::sip::transport::Flow)>>,
    /// Where caller recordings are written (`<dir>/<generated>.wav`).
    pub(crate) recordings: PathBuf,
    /// Owns work that must finish even if the call ends (filing an abandoned ticket).
    pub(crate) tracker: TaskTracker,
    /// Stops accepting new calls (shutdown); calls in progress keep going.
    pub(crate) draining: CancellationToken,
    /// The drain time is over: calls in a menu hear a goodbye and are hung up.
    pub(crate) closing: CancellationToken,
    /// Paces every call's RTP.
    pub(crate) clock: Arc<MediaClock>,
    /// `trunks.allow`: the sources whose P-Asserted-Identity is believed (none when empty).
    pub(crate) trusted: Arc<Vec<crate::sip::guard::IpNet>>,
    /// Which numbers may be called back, and how often (also without a call-back trunk:
    /// the flagged ticket asks staff to call).
    pub(crate) callback: Arc<crate::config::CallbackConfig>,
    /// How log lines show callers' numbers.
    pub(crate) log: crate::config::LogConfig,
    /// Where operators may transfer callers.
    pub(crate) dialplan: super::dialplan::DialPlan,
    /// How long an agent's phone rings for a caller transferred to them.
    pub(crate) agent_ring: Duration,
    /// The civil time schedules are read by (the system's, or a test's).
    pub(crate) wall_clock: crate::menu::schedule::WallClock,
    /// Where each call's row goes when it ends (never blocks).
    pub(crate) history: crate::history::History,
    /// Supervisors and the feature codes they dial to listen, whisper or barge.
    pub(crate) monitoring: Arc<super::monitor::Monitoring>,
    /// The queues whose talks with operators are recorded (`record: true`).
    pub(crate) recorded_queues: Arc<Vec<String>>,
    /// Per queue, its `record_announcement` prompt.
    pub(crate) queue_announcements: Arc<Vec<(String, String)>>,
    /// The city's emergency announcements.
    pub(crate) announcements: Arc<crate::dispatch::announcements::Board>,
    /// Speech of dynamic text (status notes, dates, announcements); `None` answers mean the
    /// recorded words are said instead.
    pub(crate) speech: crate::media::tts::Speech,
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

impl CallContext {
    /// The settings every call's core decides with.
    pub(crate) fn core_config(&self) -> CoreConfig {
        CoreConfig {
            limits: self.limits.clone(),
            emergency: self.emergency.clone(),
            callback: self.callback.clone(),
            default_language: self.default_language.clone(),
            operators: self.queues.is_some(),
            callbacks: self.callbacks.is_some(),
            dialplan: self.dialplan.clone(),
            agent_ring: self.agent_ring,
            recorded_queues: self.recorded_queues.clone(),
            queue_announcements: self.queue_announcements.clone(),
        }
    }
}

/// A leg's IO: its dialog, its events, and its RTP port (shared with the media clock's bridge
/// while the caller is bridged to it).
pub(crate) struct LegIo {
    pub(crate) id: LegId,
    pub(crate) handle: DialogHandle,
    pub(crate) events: mpsc::Receiver<LegEvent>,
    /// `None` once a call-back's answered caller took it as their slot on the media clock.
    pub(crate) port: Option<Arc<RtpPort>>,
    /// A browser's leg: its ICE, DTLS and SRTP, shared with the bridges that relay it.
    pub(crate) webrtc: Option<SharedWebRtc>,
}

impl LegIo {
    /// A browser leg's answer sets its far end's ICE credentials, fingerprint and DTLS role
    /// (the core reads the same answer for its codec; one that is not WebRTC is refused
    /// there).
    fn on_event(&self, ev: &LegEvent) {
        let (Some(w), LegEvent::Answered { sdp }) = (&self.webrtc, ev) else {
            return;
        };
        let Ok(crate::media::sdp::Remote::WebRtc(_, remote)) = crate::media::sdp::parse_any(sdp)
        else {
            return;
        };
        let mut w = w.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = w.leg.set_remote(Instant::now(), remote) {
            warn!(error = %e, "the browser's answer cannot carry media");
        }
    }
}

/// The legs a call has placed and not let go of, read together.
#[derive(Default)]
pub(crate) struct Legs(Vec<LegIo>);

impl Legs {
    pub(crate) fn add(&mut self, io: LegIo) {
        self.0.push(io);
    }

    pub(crate) fn get(&self, id: LegId) -> Option<&LegIo> {
        self.0.iter().find(|l| l.id == id)
    }

    pub(crate) fn get_mut(&mut self, id: LegId) -> Option<&mut LegIo> {
        self.0.iter_mut().find(|l| l.id == id)
    }

    pub(crate) fn remove(&mut self, id: LegId) -> Option<LegIo> {
        let i = self.0.iter().position(|l| l.id == id)?;
        Some(self.0.swap_remove(i))
    }

    /// Hang up and release every leg (the call is over).
    pub(crate) async fn hang_up_all(&mut self) {
        for l in self.0.drain(..) {
            l.handle.hangup().await;
            l.handle.release();
        }
    }

    /// The next event of any leg (`None`: the UA forgot that leg, which is then let go of
    /// here too). Pending forever without legs.
    pub(crate) async fn next(&mut self) -> (LegId, Option<LegEvent>) {
        let (id, ev) = poll_fn(|cx| {
            for l in &mut self.0 {
                if let Poll::Ready(ev) = l.events.poll_recv(cx) {
                    return Poll::Ready((l.id, ev));
                }
            }
            Poll::Pending
        })
        .await;
        match &ev {
            None => {
                self.remove(id);
            }
            Some(ev) => {
                if let Some(l) = self.get(id) {
                    l.on_event(ev);
                }
            }
        }
        (id, ev)
    }

    /// Carry out [`Action::DropLeg`].
    pub(crate) async fn drop_leg(&mut self, id: LegId, how: LegEnd) {
        let Some(l) = self.remove(id) else { return };
        match how {
            LegEnd::Forget => {}
            LegEnd::Release => l.handle.release(),
            LegEnd::HangUp => l.handle.hangup().await,
            LegEnd::HangUpAndRelease => {
                l.handle.hangup().await;
                l.handle.release();
            }
        }
    }
}

/// What placing a leg needs from the server.
pub(crate) struct LegDeps<'a> {
    pub(crate) ports: &'a Arc<PortPool>,
    pub(crate) outbound: &'a OutboundHandle,
    pub(crate) agent_contacts: &'a DashMap<String, (String, Flow)>,
}

/// Carry out a [`PlaceLeg`]: an RTP port, our offer in the far end's address family, an
/// INVITE (along the agent's registration flow, or to the URI's address, looked up first if
/// need be).
pub(crate) async fn place_leg(
    deps: &LegDeps<'_>,
    p: PlaceLeg,
) -> (Result<Placed, NotPlaced>, Option<LegIo>) {
    let contact = match &p.to {
        Dial::Agent(agent) => match deps.agent_contacts.get(agent) {
            Some(c) => Some(c.value().clone()),
            None => return (Err(NotPlaced::NoPhone), None),
        },
        Dial::Uri { .. } => None,
    };
    let Some(port) = deps.ports.allocate() else {
        return (Err(NotPlaced::NoPort), None);
    };
    let (destination, looked_up) = match &p.to {
        Dial::Agent(_) => (None, None),
        Dial::Uri { at: Some(a), .. } => (Some(Ok(*a)), None),
        Dial::Uri {
            uri,
            at: None,
            pick,
        } => {
            let found =
                deps.outbound
                    .destinations(uri)
                    .await
                    .and_then(|all| match all.is_empty() {
                        true => Err(format!("{uri}: no address")),
                        false => Ok(all),
                    });
            let destination = match &found {
                Ok(all) => Ok(all[pick % all.len()]),
                Err(e) => Err(e.clone()),
            };
            (Some(destination), Some(found))
        }
    };
    let toward = match (&contact, &destination) {
        (Some((_, flow)), _) => Some(flow.remote.ip()),
        (None, Some(Ok(a))) => Some(a.ip()),
        (None, _) => None,
    };
    let ip = leg_media_ip(p.local_ip, &port, toward);
    let local = SocketAddr::new(ip, port.port);
    // An agent registered over a WebSocket is a browser: its leg is WebRTC.
    let browser = contact
        .as_ref()
        .is_some_and(|(_, flow)| matches!(flow.transport, Transport::Ws | Transport::Wss));
    let webrtc = match browser {
        false => None,
        true => match DtlsIdentity::shared() {
            Ok(identity) => Some(Arc::new(std::sync::Mutex::new(BrowserMedia::new(
                WebRtcLeg::new(identity, Instant::now()),
            )))),
            Err(e) => {
                error!(error = %e, "no DTLS certificate: cannot call a browser");
                return (Err(NotPlaced::NoPhone), None);
            }
        },
    };
    let sdp = match &webrtc {
        None => LegSdp::new(local),
        Some(w) => LegSdp::new_webrtc(
            local,
            w.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .leg
                .local()
                .clone(),
        ),
    };
    let offer = Bytes::from(sdp.offer(p.codec));
    let mut headers = p.headers;
    if let Some(number) = &p.asserted {
        headers.insert(0, asserted_identity(number, ip));
    }
    let call = match (contact, p.to) {
        (Some((contact, flow)), _) => {
            p.span
                .in_scope(|| info!(%contact, "offering the call to an operator"));
            deps.outbound
                .invite_via(
                    &contact,
                    flow,
                    &p.from_user,
                    Some(p.from_display),
                    headers,
                    offer,
                )
                .instrument(p.span.clone())
                .await
        }
        (None, Dial::Uri { uri, .. }) => {
            deps.outbound
                .invite_to(
                    &uri,
                    destination.unwrap_or_else(|| Err("no destination".into())),
                    &p.from_user,
                    Some(p.from_display),
                    headers,
                    offer,
                )
                .instrument(p.span.clone())
                .await
        }
        (None, Dial::Agent(_)) => unreachable!("an agent's leg has its contact"),
    };
    let io = LegIo {
        id: p.leg,
        handle: call.handle,
        events: call.events,
        port: Some(Arc::new(port)),
        webrtc,
    };
    let placed = Placed {
        sdp,
        toward,
        looked_up,
    };
    (Ok(placed), Some(io))
}

/// The media clock's bridge for a [`BridgeTo`] on the leg's port (`None`: the leg gave its
/// port away).
pub(crate) fn bridge_for(leg: &LegIo, b: &BridgeTo, silence: Duration) -> Option<Bridge> {
    let bridge = leg_bridge(
        leg.port.clone()?,
        (b.media.1, b.scope),
        b.media.0,
        b.answered,
        b.operator,
        silence,
    );
    Some(match &leg.webrtc {
        Some(w) => bridge.webrtc(w.clone()),
        None => bridge,
    })
}

/// One call's task: from the answer to the end.
pub(crate) async fn run_call(
    setup: CallSetup,
    ctx: CallContext,
    config: Arc<CoreConfig>,
    cancel: CancellationToken,
) {
    let CallSetup {
        call,
        meta,
        port,
        media,
        local_media,
        session_id,
        registry_id,
        arrived,
        menu,
    } = setup;
    let withheld = withholds_identity(&call);
    let IncomingCall {
        handle, mut events, ..
    } = call;
    let caller_media = CallerMedia {
        local: local_media,
        session_id,
        neg: media.negotiated(),
    };
    let no_media = Duration::from_secs(ctx.limits.no_media_seconds);
    let (media, mut notes) = ctx.clock.attach(port, media, no_media, Span::current());
    let hangup = ctx.registry.hangup_token(registry_id);
    let (command_tx, mut commands) = mpsc::channel(COMMANDS);
    ctx.registry.set_commands(registry_id, command_tx);
    let (work_tx, mut work_rx) = mpsc::channel(WORK_QUEUE);
    let call_id = meta.call_id.clone();
    let answered = now();
    let mut meta = meta;
    meta.answered_at = ctx.wall_clock.now();
    let facts = Facts::new(arrived, answered);
    let kept_meta = meta.clone();
    let repeat_callers = menu.file.repeat_callers;
    let mut core = CallCore::new(answered, config, menu, meta, registry_id, caller_media)
        .with_announcements(ctx.announcements.snapshot());
    // The caller's open request, for `repeat_callers`: only for a number the trunk vouches
    // for and the caller does not withhold (a claimed number could be anyone's).
    let known = kept_meta
        .identity
        .asserted()
        .filter(|n| !withheld && dialable_number(n));
    if let (true, Some(number)) = (repeat_callers, known) {
        let store = ctx.tickets.clone();
        let tx = work_tx.clone();
        let number = number.to_owned();
        let wall = ctx.wall_clock;
        ctx.tracker.spawn(
            async move {
                let found = match store.open_request_of(&number).await {
                    Ok(found) => found,
                    Err(e) => {
                        warn!(error = %e, "open request lookup failed");
                        None
                    }
                };
                let r = found.map(|(id, filed)| engine::OpenRequest {
                    id,
                    days_ago: ((wall_now(&wall) - filed).whole_days()).clamp(0, u32::MAX as i64)
                        as u32,
                });
                let _ = tx.send(Input::Engine(engine::Input::OpenRequest(r))).await;
            }
            .in_current_span(),
        );
    }
    let mut d = Driver {
        ctx,
        handle,
        media,
        legs: Legs::default(),
        queue_events: None,
        work_tx,
        recorder: None,
        recorded: Vec::new(),
        registry_id,
        call_id,
        ended: None,
        admin_reply: None,
        queue_reply: None,
        facts,
        meta: kept_meta,
    };
    core.start(now());
    let mut closing = false;
    let reason = loop {
        while let Some(a) = core.poll_action() {
            if let Some(input) = d.carry_out(a).await {
                core.handle(now(), input);
            }
        }
        if let Some(r) = d.ended {
            break r;
        }
        let deadline = core.next_deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => core.handle(now(), Input::Shutdown),
            _ = hangup.cancelled() => core.handle(now(), Input::AdminHangup),
            _ = d.ctx.closing.cancelled(), if !closing => {
                closing = true;
                core.handle(now(), Input::Closing);
            }
            ev = events.recv() => match ev {
                Some(DialogEvent::Info { content_type, body }) => {
                    if let Some(digit) = d.info_key(&content_type, &body) {
                        core.handle(now(), Input::Digit(digit));
                    }
                }
                Some(ev) => core.handle(now(), Input::Dialog(ev)),
                None => core.handle(now(), Input::DialogGone),
            },
            Some(note) = notes.recv() => {
                if let Some(input) = d.on_note(note) {
                    core.handle(now(), input);
                }
            }
            Some(input) = work_rx.recv() => {
                d.note_result(&input);
                core.handle(now(), input)
            }
            Some(cmd) = commands.recv() => match cmd {
                CallCommand::Consulting(target) => core.handle(now(), Input::Consulting(target)),
                CallCommand::Transfer { to, via, reply } => {
                    // Answered by the core's `AdminTransferAnswer`, among the actions of
                    // this same turn.
                    d.admin_reply = Some(reply);
                    core.handle(now(), Input::AdminTransfer { to, via });
                    while let Some(a) = core.poll_action() {
                        if let Some(input) = d.carry_out(a).await {
                            core.handle(now(), input);
                        }
                    }
                    if let Some(reply) = d.admin_reply.take() {
                        let _ = reply.send(Err((409, "the call is ending".into())));
                    }
                }
                CallCommand::Monitor { monitor, reply } => {
                    let _ = reply.send(d.monitor(monitor));
                }
                CallCommand::QueueByPhone { agent, queue, reply } => {
                    // Answered by the core's `QueueByPhoneAnswer` when the transfer ends
                    // (the queue's answer comes within this turn); dropped, the phone's
                    // call hears that the caller's call has ended.
                    d.queue_reply = Some(reply);
                    core.handle(now(), Input::QueueByPhone { agent, queue });
                }
            },
            qe = recv_opt(&mut d.queue_events) => match qe {
                Some(qe) => core.handle(now(), Input::Queue(qe)),
                None => d.queue_events = None,
            },
            (leg, ev) = d.legs.next() => core.handle(now(), Input::Leg(leg, ev)),
            _ = sleep_opt(deadline) => core.handle_timeout(now()),
        }
    };
    d.finish(&core, reason).await;
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
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

/// The IO of one call.
struct Driver {
    ctx: CallContext,
    handle: DialogHandle,
    /// The call's slot on the shared [`MediaClock`].
    media: MediaHandle,
    legs: Legs,
    queue_events: Option<mpsc::Receiver<QueueEvent>>,
    /// Where work done in tasks reports back.
    work_tx: mpsc::Sender<Input>,
    /// The caller's recording file; the media clock meters and collects the samples.
    recorder: Option<Recorder>,
    /// Samples taken from the clock, reused between writes.
    recorded: Vec<i16>,
    registry_id: u64,
    call_id: String,
    ended: Option<EndReason>,
    /// Where the answer to the admin's transfer goes (set while the core decides).
    admin_reply: Option<tokio::sync::oneshot::Sender<Result<TransferId, (u16, String)>>>,
    /// Where the answer to the operator's call to a queue goes, until the transfer ends.
    queue_reply: Option<tokio::sync::oneshot::Sender<Result<(), (u16, String)>>>,
    /// What the call did, for its row in the call history.
    facts: Facts,
    meta: super::setup::CallMeta,
}

impl Driver {
    /// Put a supervisor on the caller's bridge, if there is one and it has no supervisor.
    fn monitor(&mut self, m: super::registry::MonitorRequest) -> Result<(), (u16, String)> {
        let mut slot = self.media.lock();
        if slot.monitored() {
            return Err((486, "the call has a supervisor already".into()));
        }
        slot.set_monitor(m.0)
            .map_err(|_| (480, "the call is not with an operator".into()))
    }

    /// Results of work the history keeps (a ticket's number, the 911 audit row's id).
    fn note_result(&mut self, input: &Input) {
        match input {
            Input::Engine(engine::Input::TicketFiled { id }) => self.facts.ticket_filed(*id),
            Input::Audited(Some(id)) => self.facts.audited(*id),
            _ => {}
        }
    }

    /// Ask operator `agent`'s consultation on `dialog` for its target; its legs become ours.
    async fn join_consult(&mut self, dialog: crate::sip::ua::DialogId, agent: &str) -> Input {
        let Some((owner, tx)) = self.ctx.registry.consult(dialog) else {
            return Input::ConsultJoined(Err((481, "Replaces names no call of ours".into())));
        };
        if owner != agent {
            warn!(%agent, %owner, "Replaces names another operator's call");
            return Input::ConsultJoined(Err((403, "another operator's call".into())));
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        if tx
            .send(super::registry::ConsultCommand::HandOver { reply })
            .await
            .is_err()
        {
            return Input::ConsultJoined(Err((481, "the consultation has ended".into())));
        }
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(Ok(joined))) => {
                for io in joined.legs {
                    self.legs.add(io);
                }
                Input::ConsultJoined(Ok(Box::new((*joined.transfer, joined.connected))))
            }
            Ok(Ok(Err(e))) => Input::ConsultJoined(Err(e)),
            Ok(Err(_)) | Err(_) => {
                Input::ConsultJoined(Err((481, "the consultation has ended".into())))
            }
        }
    }

    /// A key sent by SIP INFO, unless the same key was heard in the audio a moment ago.
    fn info_key(&mut self, content_type: &str, body: &[u8]) -> Option<char> {
        let d = dtmf_info_digit(content_type, body)?;
        let mut st = self.media.lock();
        if st.media.on_info_key(d, std::time::Instant::now()) {
            debug!(digit = %d, "INFO repeats the key heard in the audio");
            return None;
        }
        st.media.stats.digits += 1;
        Some(d)
    }

    /// What the media clock noticed, as the core's input (recorded audio is written here).
    fn on_note(&mut self, note: MediaNote) -> Option<Input> {
        match note {
            MediaNote::Digit(d) => Some(Input::Digit(d)),
            // A note from before a barge-in, or before more was queued, is stale.
            MediaNote::PlayDone { stops } => {
                let st = self.media.lock();
                (!st.media.is_playing() && st.media.stops() == stops).then_some(Input::PlayDone)
            }
            MediaNote::RecordingData => {
                self.write_recorded();
                None
            }
            MediaNote::RecordingEnded => Some(Input::RecordingEnded),
            MediaNote::NoMedia => Some(Input::NoMedia),
            MediaNote::LegSilent => Some(Input::LegSilent),
            MediaNote::LegMediaFailed => Some(Input::LegMediaFailed(
                "the browser's ICE, DTLS or consent failed".to_owned(),
            )),
        }
    }

    /// Carry out one action of the core; the result, if the core needs it at once.
    async fn carry_out(&mut self, a: Action) -> Option<Input> {
        match a {
            Action::ReplyCaller { txn, code, body } => {
                self.handle.answer_reoffer(txn, code, body).await
            }
            Action::RequestCaller {
                req,
                method,
                headers,
            } => self.handle.request(req, method, headers, None).await,
            Action::HangUpCaller => self.handle.hangup().await,
            Action::Play(p) => self.media.lock().media.play(p),
            Action::StopPlayback => self.media.lock().media.stop(),
            Action::ConfirmMedia => self.media.lock().media.confirm(),
            Action::Renegotiate((neg, addr)) => self.media.lock().media.renegotiate(neg, addr),
            Action::SetBridge(b) => {
                let silence = Duration::from_secs(self.ctx.limits.operator_silence_seconds);
                let record = b.is_some_and(|b| b.record);
                let bridge = b.and_then(|b| bridge_for(self.legs.get(b.leg)?, &b, silence));
                let bridged = bridge.is_some();
                let mut slot = self.media.lock();
                slot.set_bridge(bridge);
                if !(record && bridged) {
                    slot.set_call_tap(None);
                } else if !slot.recording_call() {
                    match crate::media::call_record::spawn_writer(
                        &self.ctx.recordings,
                        &self.call_id,
                        &self.ctx.tracker,
                    ) {
                        Ok(tap) => {
                            info!("recording the talk with the operator");
                            slot.set_call_tap(Some(tap));
                        }
                        Err(e) => {
                            warn!(error = %e, "the talk with the operator cannot be recorded")
                        }
                    }
                }
            }
            Action::RearmLegWatch => self.media.lock().rearm_leg_watch(std::time::Instant::now()),
            Action::StartRecording { max, silence } => return self.start_recording(max, silence),
            Action::CloseRecording { report } => {
                let media_url = self.close_recording();
                return report.then_some(Input::RecordingClosed { media_url });
            }
            Action::EndMedia => self.media.end(),
            Action::PlaceLeg(p) => {
                let leg = p.leg;
                let deps = LegDeps {
                    ports: &self.ctx.ports,
                    outbound: &self.ctx.outbound,
                    agent_contacts: &self.ctx.agent_contacts,
                };
                let (placed, io) = place_leg(&deps, *p).await;
                if let Some(io) = io {
                    self.legs.add(io);
                }
                return Some(Input::Placed(leg, placed));
            }
            Action::RequestLeg {
                leg,
                req,
                method,
                headers,
                body,
            } => {
                if let Some(l) = self.legs.get(leg) {
                    l.handle.request(req, method, headers, body).await;
                }
            }
            Action::AnswerRequest {
                leg,
                txn,
                code,
                headers,
            } => match leg {
                None => self.handle.answer_request(txn, code, headers).await,
                Some(leg) => {
                    if let Some(l) = self.legs.get(leg) {
                        l.handle.answer_request(txn, code, headers).await;
                    }
                }
            },
            Action::ShowOperator(view) => {
                let dialog = view
                    .as_ref()
                    .and_then(|v| self.legs.get(v.leg))
                    .map(|l| l.handle.id);
                self.ctx
                    .registry
                    .show_operator(self.registry_id, view, dialog);
            }
            Action::AdminTransferAnswer(answer) => {
                if let Some(reply) = self.admin_reply.take() {
                    let _ = reply.send(answer);
                }
            }
            Action::QueueByPhoneAnswer(answer) => {
                if let Some(reply) = self.queue_reply.take() {
                    let _ = reply.send(answer);
                }
            }
            Action::ShowTransfer(view) => self.ctx.registry.show_transfer(&view),
            Action::RecordTransfer(view) => {
                self.ctx.registry.show_transfer(&view);
                let store = self.ctx.tickets.clone();
                self.ctx.tracker.spawn(
                    async move {
                        let record = crate::dispatch::tickets::TransferRecord {
                            id: view.id,
                            call_id: view.call_id,
                            operator: view.operator,
                            target: view.target,
                            requested_via: view.via.to_owned(),
                        };
                        if let Err(e) = store.record_transfer(&record).await {
                            error!(error = %e, "transfer record not written");
                        }
                    }
                    .in_current_span(),
                );
            }
            Action::TransferOutcome {
                record,
                outcome,
                ticket_note,
            } => {
                if outcome == "connected" {
                    let event =
                        self.facts
                            .transferred(now(), &self.call_id, record.operator.clone());
                    if let Some(e) = event {
                        self.ctx.history.record(crate::history::Record::Queue(e));
                    }
                }
                let store = self.ctx.tickets.clone();
                let call_id = self.call_id.clone();
                self.ctx.tracker.spawn(
                    async move {
                        if let Err(e) = store.transfer_outcome(&record, &outcome).await {
                            error!(error = %e, "transfer outcome not written");
                        }
                        if let Some(note) = ticket_note {
                            if let Err(e) = store.note_transfer(&call_id, &note).await {
                                error!(error = %e, "the call's tickets could not note the transfer");
                            }
                        }
                    }
                    .in_current_span(),
                );
            }
            Action::CountTransfer { kind, outcome } => self.ctx.metrics.add(
                "ivr311_transfers_total",
                "Transfers operators and admins asked for, by target kind and outcome.",
                &[("outcome", outcome), ("target", kind)],
                1,
            ),
            Action::JoinConsult { dialog, agent } => {
                return Some(self.join_consult(dialog, &agent).await)
            }
            Action::CountRefusal(reason) => self.ctx.metrics.add(
                "ivr311_transfer_refusals_total",
                "Transfer requests (REFER, an agent's call, the admin API) refused, by reason.",
                &[("reason", reason)],
                1,
            ),
            Action::ReplyLeg {
                leg,
                txn,
                code,
                body,
            } => {
                if let Some(l) = self.legs.get(leg) {
                    l.handle.answer_reoffer(txn, code, body).await;
                }
            }
            Action::DropLeg { leg, how } => self.legs.drop_leg(leg, how).await,
            Action::FileTicket { ticket, report } => {
                self.facts.ticket(&ticket.service_code);
                let store = self.ctx.tickets.clone();
                let tx = self.work_tx.clone();
                let service = ticket.service_code.clone();
                // On the server's tracker, so shutdown waits for it and no ticket is lost.
                self.ctx.tracker.spawn(
                    async move {
                        let input = match store.file(*ticket).await {
                            Ok(t) => {
                                info!(id = t.service_request_id, %service, "ticket filed");
                                engine::Input::TicketFiled {
                                    id: t.service_request_id,
                                }
                            }
                            Err(e) => {
                                error!(error = %e, %service, "ticket could not be filed");
                                engine::Input::TicketFailed
                            }
                        };
                        if report {
                            let _ = tx.send(Input::Engine(input)).await;
                        }
                    }
                    .in_current_span(),
                );
            }
            Action::FindDuplicate {
                service_code,
                zipcode,
                days,
            } => {
                let store = self.ctx.tickets.clone();
                let tx = self.work_tx.clone();
                let now = wall_now(&self.ctx.wall_clock);
                self.ctx.tracker.spawn(
                    async move {
                        let since = now - time::Duration::days(days.into());
                        let r = match store.find_duplicate(&service_code, &zipcode, since).await {
                            Ok(r) => r,
                            Err(e) => {
                                // The caller files a new request as usual.
                                warn!(error = %e, "duplicate lookup failed");
                                None
                            }
                        };
                        let _ = tx.send(Input::Engine(engine::Input::Duplicate(r))).await;
                    }
                    .in_current_span(),
                );
            }
            Action::JoinRequest(id) => {
                let store = self.ctx.tickets.clone();
                let tx = self.work_tx.clone();
                self.ctx.tracker.spawn(
                    async move {
                        let ok = match store.add_duplicate(id).await {
                            Ok(ok) => ok,
                            Err(e) => {
                                warn!(error = %e, "adding a caller to a request failed");
                                false
                            }
                        };
                        let _ = tx.send(Input::Engine(engine::Input::Joined { ok })).await;
                    }
                    .in_current_span(),
                );
            }
            Action::LookupTicket { id, language } => {
                let store = self.ctx.tickets.clone();
                let speech = self.ctx.speech.clone();
                let tx = self.work_tx.clone();
                // Speech is rendered here, in the lookup's own task (on the speech thread,
                // with its time limit), never on the call's loop.
                self.ctx.tracker.spawn(
                    async move {
                        let r = match store.get(id).await {
                            Ok(Some(t)) => {
                                let spoken = speak_status(&speech, &language, &t).await;
                                let r = StatusResult::Found {
                                    open: t.status == Status::Open,
                                    days_since_update: (time::OffsetDateTime::now_utc()
                                        - t.updated_datetime)
                                        .whole_days()
                                        .clamp(0, u32::MAX as i64)
                                        as u32,
                                    filed: spoken.iter().any(|(k, _)| k == say::SPOKEN_FILED),
                                    notes: spoken.iter().any(|(k, _)| k == say::SPOKEN_NOTES),
                                };
                                let _ = tx.send(Input::Spoken(spoken)).await;
                                r
                            }
                            Ok(None) => StatusResult::NotFound,
                            Err(e) => {
                                warn!(error = %e, "status lookup failed");
                                StatusResult::Failed
                            }
                        };
                        let _ = tx.send(Input::Engine(engine::Input::Status(r))).await;
                    }
                    .in_current_span(),
                );
            }
            Action::AuditStart(audit) => {
                let store = self.ctx.tickets.clone();
                let tx = self.work_tx.clone();
                self.ctx.tracker.spawn(
                    async move {
                        let id = match store.audit_emergency_start(&audit).await {
                            Ok(id) => Some(id),
                            Err(e) => {
                                error!(error = %e, "911 audit row could not be written; redirecting anyway");
                                None
                            }
                        };
                        let _ = tx.send(Input::Audited(id)).await;
                    }
                    .in_current_span(),
                );
            }
            Action::AuditOutcome { id, outcome } => {
                let store = self.ctx.tickets.clone();
                self.ctx.tracker.spawn(
                    async move {
                        if let Err(err) = store.audit_emergency_outcome(id, &outcome).await {
                            error!(error = %err, "911 audit outcome not written");
                        }
                    }
                    .in_current_span(),
                );
            }
            Action::CountEmergency { method, outcome } => self.ctx.metrics.add(
                "ivr311_emergency_redirects_total",
                "Callers redirected to 911, by method and outcome.",
                &[("method", method), ("outcome", outcome)],
                1,
            ),
            Action::Queue(cmd) => return self.queue(cmd).await,
            Action::ClaimCallback(number) => {
                let store = self.ctx.tickets.clone();
                let tx = self.work_tx.clone();
                let per_day = self.ctx.callback.per_number_per_day;
                let call_id = self.call_id.clone();
                self.ctx.tracker.spawn(
                    async move {
                        let claimed = store.claim_callback(&number.e164, &call_id, per_day).await;
                        let _ = tx.send(Input::CallbackClaimed(claimed.ok(), number)).await;
                    }
                    .in_current_span(),
                );
            }
            Action::KeepPlace(req) => {
                // The call-back's talk with the operator is recorded as this call's would be.
                let recording = super::callback::CallbackRecording {
                    dir: (self.ctx.recorded_queues.contains(&req.queue))
                        .then(|| self.ctx.recordings.clone()),
                    announcement: (self.ctx.queue_announcements.iter())
                        .find(|(q, _)| *q == req.queue)
                        .map(|(_, prompt)| prompt.clone()),
                };
                let kept = match &self.ctx.callbacks {
                    Some(cb) => cb.keep_place(*req, recording).await,
                    None => Err(super::callback::NotKept::NotWaiting),
                };
                if kept.is_ok() {
                    self.facts.callback_kept(now());
                }
                return Some(Input::CallbackKept(kept));
            }
            Action::FileCallbackTicket(t) => {
                let store = self.ctx.tickets.clone();
                let tx = self.work_tx.clone();
                self.ctx.tracker.spawn(
                    async move {
                        let ok = super::callback::file_flagged(&store, *t).await;
                        let _ = tx.send(Input::CallbackFiled(ok)).await;
                    }
                    .in_current_span(),
                );
            }
            Action::Show { language, state } => {
                self.facts.language(&language);
                self.ctx
                    .registry
                    .update(self.registry_id, &language, &state)
            }
            Action::End(reason) => self.ended = Some(reason),
        }
        None
    }

    async fn queue(&mut self, cmd: QueueCommand) -> Option<Input> {
        let q = self.ctx.queues.clone()?;
        let caller = self.registry_id;
        match cmd {
            QueueCommand::Enqueue {
                queue,
                skill,
                context,
            } => {
                let (tx, rx) = mpsc::channel(16);
                let result = q
                    .enqueue_with_context(caller, &queue, skill, 0, Some(context), tx)
                    .await;
                if result.is_ok() {
                    self.facts.queued(now(), &queue);
                    self.queue_events = Some(rx);
                }
                return Some(Input::Enqueued(result));
            }
            QueueCommand::Abandon => {
                self.facts.left_queue(now());
                q.abandon(caller).await;
                self.queue_events = None;
            }
            QueueCommand::StopListening => {
                self.facts.left_queue(now());
                self.queue_events = None;
            }
            QueueCommand::OfferAnswered(agent) => {
                self.facts.operator_answered(now(), &agent);
                q.offer_answered(caller, &agent).await
            }
            QueueCommand::OfferFailed(agent, why) => q.offer_failed(caller, &agent, why).await,
            QueueCommand::OfferWithdrawn(agent) => q.offer_withdrawn(caller, &agent).await,
            QueueCommand::CallEnded(agent) => {
                self.facts.operator_call_ended(now());
                q.call_ended(&agent).await
            }
            QueueCommand::Rejoin {
                queue,
                skill,
                since,
            } => {
                let (tx, rx) = mpsc::channel(16);
                let result = q.rejoin(caller, &queue, skill, since, tx).await;
                if result.is_ok() {
                    self.queue_events = Some(rx);
                }
                return Some(Input::Rejoined(result));
            }
            QueueCommand::RingDirect {
                agent,
                ring_timeout,
            } => {
                return Some(Input::RangDirect(
                    q.ring_direct(caller, &agent, ring_timeout).await,
                ))
            }
            QueueCommand::DirectAnswered(agent) => q.direct_answered(caller, &agent).await,
            QueueCommand::Requeue(agent) => q.requeue(caller, &agent).await,
        }
        None
    }

    fn start_recording(&mut self, max: Duration, silence: Duration) -> Option<Input> {
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
        match Recorder::create(&path) {
            Ok(r) => {
                info!(path = %path.display(), "recording");
                self.recorder = Some(r);
                self.media
                    .lock()
                    .start_recording(VoiceMeter::new(t, max, silence));
                None
            }
            Err(e) => {
                // Cannot record: file the ticket without a description rather than lose it.
                error!(error = %e, "cannot record; continuing without a description");
                Some(Input::RecordingFailed)
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

    /// Close the recording; the file name (in the recordings directory) of what was kept.
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

    /// The call is over: what the core did not let go of is, its figures are counted, and
    /// the registry forgets the call. In that order: once `/health` shows a call gone, its
    /// packets, digits and metrics are in the totals.
    async fn finish(mut self, core: &CallCore, reason: EndReason) {
        self.legs.hang_up_all().await;
        self.handle.release();
        let s = self.media.lock().media.stats;
        let registry = &self.ctx.registry;
        registry.rtp_in.fetch_add(s.packets_in, Ordering::Relaxed);
        registry.rtp_out.fetch_add(s.packets_out, Ordering::Relaxed);
        registry.digits.fetch_add(s.digits, Ordering::Relaxed);
        self.record_metrics(core, reason, s);
        let row = self
            .facts
            .record(now(), &self.meta, core.outcome(), reason, core.menu_path());
        self.ctx
            .history
            .record(crate::history::Record::Call(Box::new(row)));
        info!(
            ?reason,
            menu_path = %core.menu_path(),
            packets_in = s.packets_in,
            packets_out = s.packets_out,
            digits = s.digits,
            malformed_in = s.malformed_in,
            foreign_in = s.foreign_in,
            "call ended"
        );
        self.ctx.registry.remove(self.registry_id);
    }

    fn record_metrics(&self, core: &CallCore, reason: EndReason, s: MediaStats) {
        let m = &self.ctx.metrics;
        let st = core.menu_stats();
        let outcome = core.outcome();
        let line = core.line();
        m.add(
            "ivr311_calls_total",
            "Finished calls by outcome.",
            &[("outcome", outcome)],
            1,
        );
        m.add(
            "ivr311_line_calls_total",
            "Finished calls by line dialled (`default`: --menu) and outcome.",
            &[("line", line), ("outcome", outcome)],
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
                "Times callers entered each menu, by line.",
                &[("line", line), ("menu", menu)],
                1,
            );
        }
        for (menu, n) in &st.invalid {
            m.add(
                "ivr311_dtmf_invalid_total",
                "Invalid keys pressed, by line and menu.",
                &[("line", line), ("menu", menu)],
                *n as u64,
            );
        }
        for (menu, n) in &st.timeouts {
            m.add(
                "ivr311_dtmf_timeouts_total",
                "Silent waits for a key, by line and menu.",
                &[("line", line), ("menu", menu)],
                *n as u64,
            );
        }
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

/// Whether the caller asked for their identity to be withheld (RFC 3323 `Privacy: id`,
/// `header` or `user`, RFC 3325).
fn withholds_identity(call: &IncomingCall) -> bool {
    call.headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("Privacy"))
        .flat_map(|h| h.value.split(';'))
        .any(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "id" | "header" | "user"
            )
        })
}

/// A number that names one line: digits (and a leading `+`), not `anonymous`, `unknown`,
/// `restricted` and the like.
fn dialable_number(n: &str) -> bool {
    let digits = n.strip_prefix('+').unwrap_or(n);
    digits.len() >= 3 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// The wall clock the menu reads (the system's, or a test's), as the ticket store's type.
fn wall_now(clock: &crate::menu::schedule::WallClock) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(clock.now().as_second())
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
}

/// What is spoken about a looked-up request, by placeholder: the date it was filed and its
/// status notes (`"Update: ..."`). What cannot be rendered is left out (logged by [`Speech`]).
///
/// [`Speech`]: crate::media::tts::Speech
async fn speak_status(
    speech: &crate::media::tts::Speech,
    language: &str,
    t: &crate::dispatch::tickets::Ticket,
) -> Vec<(String, Arc<crate::media::prompt::Prompt>)> {
    let spanish = language == "es" || language.starts_with("es-");
    let filed = jiff::Timestamp::from_second(t.requested_datetime.unix_timestamp())
        .ok()
        .map(|at| {
            let today = jiff::Timestamp::now();
            crate::media::tts::filed_on(language, at, today, speech.zone())
        });
    let notes = (t.status_notes.as_deref())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            if spanish {
                format!("Actualización: {n}")
            } else {
                format!("Update: {n}")
            }
        });
    let (filed, notes) = tokio::join!(
        async {
            match &filed {
                Some(text) => speech.render(language, text).await,
                None => None,
            }
        },
        async {
            match &notes {
                Some(text) => speech.render(language, text).await,
                None => None,
            }
        }
    );
    let mut v = Vec::new();
    if let Some(p) = filed {
        v.push((say::SPOKEN_FILED.to_owned(), p));
    }
    if let Some(p) = notes {
        v.push((say::SPOKEN_NOTES.to_owned(), p));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortRange;
    use crate::media::ports::PortPool;

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
