//! The SIP user agent core: one tokio task that owns every transaction and dialog.
//!
//! Inputs: parsed messages from [`crate::sip::transport`], commands from calls
//! ([`DialogHandle`], [`OutboundHandle`]), and the earliest deadline. Outputs: bytes to the
//! transport, [`AppEvent::Invite`] for each new call, [`DialogEvent`]s to the call that owns a
//! dialog, [`LegEvent`]s to the owner of an outbound leg. All state lives in plain maps owned by
//! this task, so nothing here takes a lock.
//!
//! # Layout
//!
//! The protocol logic is sans-IO: `Core` takes each input with `now` and never reads a clock,
//! sends, spawns or waits; what must happen outside it comes out as actions that
//! [`UaCore::run`] carries out in order (sending along a flow, holding a TCP connection open,
//! waiting for room in a call's channel, looking up or connecting to the trunk's registrar).
//! The unit tests drive `Core` on virtual time with no socket.
//!
//! | file | owns | does not touch |
//! | --- | --- | --- |
//! | `mod.rs` | the public types below, [`UaCore`]: its builder and the driver loop (the transport, the commands, the tasks on the server's tracker, the heartbeat) | protocol decisions |
//! | `core.rs` | `Core`: the transaction and dialog tables, the timers table, routing each input to its role, requests we send in a dialog, hanging up | a role's own state |
//! | `acceptor.rs` | inbound requests: screening and per-source call limits, INVITE, CANCEL, ACK, in-dialog requests, the call's answers | outbound legs |
//! | `initiator.rs` | outbound legs until their final response: INVITE, digest retry, CANCEL and the 2xx that crosses it, forks; target checks | inbound calls |
//! | `session.rs` | session-timer glue (RFC 4028, logic in `crate::sip::session_timer`): refreshes, BYE for a caller that stopped | answering requests |
//! | `registrar.rs` | agents' REGISTER glue (logic in [`crate::sip::registrar`]): contacts, expiry, [`AgentEvent`]s | calls |
//! | `registration.rs` | our registration with the trunk, glue to the trunk core ([`crate::sip::trunk`]) | dialogs, calls |
//! | `lost.rs` | closed WebSockets: their agents logged out, their dialogs ended after a grace unless the browser registers again ([`DialogEvent::Lost`]) | transactions |
//! | `events.rs` | the event types and their delivery: bounded channels and backlogs, never dropped | transactions |
//! | `handle.rs` | [`DialogHandle`], [`OutboundHandle`] and their commands; DNS and TCP connects for outbound targets, in the caller's task | the core's state |
//!
//! # What it answers by itself
//!
//! - INVITE: `100 Trying` at once, then hands the call up; the call answers (200 with SDP, 488,
//!   503...) through its [`DialogHandle`]. A 2xx is retransmitted until the ACK (timer G).
//! - CANCEL: `200` for the CANCEL, `487` for the INVITE, and the call hears [`DialogEvent::Cancelled`].
//! - In-dialog: BYE (200), INFO (200, passed up), re-INVITE/UPDATE (passed up, the call answers
//!   with SDP), OPTIONS (200); CSeq going backwards gets 500; unknown dialogs get 481.
//! - Out of dialog: OPTIONS gets 200 (monitoring pings), or 503 with `Retry-After` while the
//!   node is not ready or draining ([`UaStats::out_of_service`]: an edge proxy's probe); SUBSCRIBE, MESSAGE... get 405 with
//!   `Allow`; methods we do not know get 501.
//! - REGISTER (operators logging in): answered by the [`Registrar`] when agents are configured
//!   (`UaCore::with_agents`; `Allow` then lists REGISTER), else 403. Log-ins and log-outs go
//!   out as [`AgentEvent`]s on their own channel (`UaCore::agent_events`, so the [`AppEvent`]
//!   consumers are untouched), and the preferred contact of every agent logged in is kept in a
//!   shared map (`UaCore::agent_contacts`). The flow a phone registered over is held open while
//!   it is logged in (a phone on TCP is reached only along its connection). Binding expiry
//!   rides on the same timers table as the transactions. Nonces are bound to their source and
//!   repeated failures lock an account's log-ins, as [`crate::sip::registrar`] says; the locks
//!   are published for `/admin/agents` ([`UaStats`]).
//! - Screening, before any of the above and before any state is made (`UaCore::with_screening`):
//!   requests from a known SIP scanner (by `User-Agent`, see [`crate::sip::guard`]) outside a
//!   dialog, INVITEs from sources outside the trunk allow-list, and out-of-dialog requests other
//!   than INVITE and CANCEL past their source's token bucket are dropped without an answer and
//!   counted in `ivr311_sip_requests_dropped_total{reason}`. Requests in an existing dialog are
//!   never screened.
//! - Per-source call limits ([`Screening::max_calls_per_source`], [`Screening::invites_per_second`]):
//!   a new INVITE from a source that is not a trusted trunk (listed in `trunks.allow`) is
//!   refused with `503` and `Retry-After` when its source already has that many calls, or is
//!   past its INVITE rate. The refusal is stateless (RFC 3261 §8.2.7): no transaction is kept
//!   and the 503 is sent once, not retransmitted, so a flood with a spoofed source costs no
//!   memory and is not amplified; past a bucket of refusals per source the INVITE is dropped
//!   unanswered. Each is counted (`ivr311_sip_invites_limited_total`), and logged once per
//!   source and 10 s, with a summary of the rest.
//! - Retransmitted requests are absorbed by their server transaction (the last response is sent
//!   again), so a retransmitted INVITE never becomes a second call and a retransmitted INFO is
//!   never a second digit.
//! - Extensions: `Require: 100rel` is honoured by sending no provisional but 100; session
//!   timers (RFC 4028) are agreed in our 2xx and kept by this task (refreshes counted, our own
//!   sent, BYE when the caller stops); any other required extension gets 420.
//! - Our own registration with a trunk (`trunks.register`, [`crate::sip::trunk`]): REGISTERs in
//!   client transactions of their own, the registrar's name looked up before each (by
//!   [`Resolver`], off this task), refreshed on the timers table, removed when draining.
//!
//! # Events are never dropped
//!
//! A call (or an outbound leg's owner) reads its [`DialogEvent`]s from a bounded channel; when
//! that channel is full, further events wait in order in a bounded backlog of the dialog, and a
//! task (owned by the server's [`TaskTracker`], `UaCore::with_tasks`) waits for room and has
//! the UA core deliver them. A call more than [`MAX_EVENT_BACKLOG`] events behind cannot keep
//! up: its dialog is ended as if the call had released it (BYE, or 500 before the answer,
//! CANCEL for an outbound leg not answered), counted in `ivr311_calls_ended_backlogged_total`,
//! and the call, once it has read what was queued, finds its channel closed. When a dialog ends
//! with events still queued (a BYE behind a burst of INFOs), a task hands them over in order
//! (for up to 30 s) before the channel closes.
//!
//! # Where we send
//!
//! Responses go back to the source address of the request (the `rport` behaviour of RFC 3581,
//! applied whether or not the client asked), and requests we originate inside a dialog go back
//! along the flow the dialog came in on rather than to the Contact. 311 callers are often behind
//! NAT, where the Contact is a private address; the flow is the one path known to work. The
//! Route set from Record-Route is still honoured in the request. A TCP connection a dialog runs
//! over is held open while the dialog lasts, however quiet.
//!
//! # Outbound calls
//!
//! For bridging a caller to 911 or an operator, and for call-backs: [`OutboundHandle::invite`]
//! sends an INVITE to a `sip:` URI (an IP literal, or a host name the caller's task looks up
//! first with the server's [`Resolver`]: [`crate::sip::resolve`]; over TCP when the URI says
//! `;transport=tcp`) and reports progress as [`LegEvent`]s; `OutboundHandle::invite_via` sends
//! it along a given flow instead (an agent's registration flow, which reaches phones behind
//! NAT). Log lines show the target's user part as `log.redact_numbers` says. On the first 2xx
//! the UA builds the UAC dialog (`crate::sip::dialog::Dialog::from_uac`), ACKs it itself (and ACKs every
//! retransmission of that 2xx again), and from then on the dialog is handled exactly like an
//! inbound one: the same [`DialogHandle`], the same in-dialog requests, with each
//! [`DialogEvent`] wrapped in [`LegEvent::Dialog`]. Non-2xx finals are ACKed by the INVITE
//! client transaction; a 401/407 from a trunk is answered once with `trunks.auth` (once more
//! for a `stale=true` nonce). Hanging up (or releasing) a leg that has not been answered
//! CANCELs it (RFC 3261 §9.1: only once a provisional response has arrived; if none has, the
//! CANCEL waits for the first one); a 2xx that crosses the CANCEL is ACKed and then BYEd.
//! Further 2xx from other forks (other To tags) are ACKed and BYEd too.
//!
//! Ringing has no time limit here: RFC 3261 §17.1.1.2 stops timer B once a provisional response
//! has arrived, and although our INVITE client transaction keeps it armed in Proceeding, the UA
//! does not let it fire for an outbound leg that is ringing. How long to let a leg ring is the
//! caller's decision ([`OutboundHandle::cancel`]). After a CANCEL the UA waits 64·T1 for the
//! INVITE's final response, then gives up and reports [`LegEvent::Failed`] with 487.
//!
//! # Readiness
//!
//! The loop beats [`UaStats::heartbeat`] on every turn and at least every `UA_HEARTBEAT` when
//! idle; `/health/ready` fails when it stops.
//!
//! # Memory
//!
//! Over UDP a server transaction lingers 32 s after its final response (timers J and L), so
//! with 8 s calls there are about 8 server transactions per live call (the INVITE and BYE of
//! ~4 ended calls), which makes the UA a large per-call consumer. A lingering transaction keeps
//! only its boxed state, key, flow and the exact bytes of its last response (the parsed request
//! is dropped once a final response has gone, see `ServerEntry` in `core.rs` and
//! [`crate::sip::transaction`]): measured at 1,500 concurrent calls (`ivr311-load
//! --spawn-server --concurrent 1500 --duration 70 --threads 2`), the server's RSS per live call
//! beyond idle is 48 KiB with this layout against 96 KiB with unboxed entries holding their
//! parsed requests (25 MB for the transaction table alone, ~1.8 KB of parsed request per
//! transaction). The allocator is left at glibc's defaults on purpose: about a third of the
//! remainder is free memory glibc keeps in the worker threads' arenas (mallinfo2: ~24 MB at
//! 1,500 calls, flat after the first 45 s), and what would return it costs more than it saves:
//! a periodic `malloc_trim(0)` saved 7 KiB per call but held each arena's lock for 2–45 ms per
//! call of it (stalling SIP and the call tasks), `M_ARENA_MAX=1` saved ~3 KiB, and fixed
//! trim/mmap thresholds nothing measurable.

mod acceptor;
mod core;
mod events;
mod handle;
mod initiator;
mod lost;
mod registrar;
mod registration;
mod session;
#[cfg(test)]
mod tests;

pub use self::core::ServerKey;
pub use events::{AppEvent, DialogEvent, IncomingCall, LegEvent, Refer, MAX_EVENT_BACKLOG};
pub use handle::{DialogHandle, OutboundCall, OutboundHandle};
pub use lost::LOST_FLOW_GRACE;

use self::core::{Action, Core};
use crate::logging::LogConfig;
use crate::metrics::Metrics;
use crate::sip::guard::IpNet;
use crate::sip::registrar::{AgentEvent, AgentSecret, Registrar, TrunkCredentials};
use crate::sip::resolve::Resolver;
use crate::sip::transport::{Flow, Inbound, TransportHandle};
use crate::sip::trunk::{RegisterConfig, RegistrationStatus};
use acceptor::Acceptor;
use dashmap::DashMap;
use events::DRAIN_WITHIN;
use handle::Command;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Methods we implement, for `Allow`.
pub(crate) const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY, REFER";

/// `Allow` when agents can log in (a registrar is configured).
pub(crate) const ALLOW_WITH_REGISTER: &str =
    "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY, REFER, REGISTER";

/// Internal dialog id.
pub(crate) type DialogId = u64;

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
    /// Beaten on every turn of the UA loop, and at least every `UA_HEARTBEAT` when idle
    /// (read by `/health/ready`).
    pub heartbeat: crate::heartbeat::Heartbeat,
    /// Set while the node is not ready or is draining (kept by `api::health::watch`): an
    /// out-of-dialog OPTIONS, a load balancer's probe, is then answered 503.
    pub out_of_service: std::sync::atomic::AtomicBool,
}

/// How often an idle UA loop turns anyway, to show it still would.
pub(crate) const UA_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(250);

/// An agent's log-ins refused for repeated failures (`UaStats::login_locks`).
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
    pub(crate) fn login_locks(&self) -> Vec<LoginLock> {
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
    pub(crate) fn trunk_registration(&self) -> Option<RegistrationStatus> {
        let guard = self.trunk.lock().unwrap_or_else(|e| e.into_inner());
        let (at, status) = guard.as_ref()?;
        Some(status.aged(at.elapsed().as_secs()))
    }
}

/// The UA core task: the sans-IO `Core` (every transaction and dialog) and the IO around it
/// (the transport, the commands from handles, the tasks it starts). Build it with
/// [`UaCore::new`] and the `with_*` methods, take its handles, then [`UaCore::run`] it.
pub struct UaCore {
    core: Core,
    transport: TransportHandle,
    commands: mpsc::Receiver<Command>,
    /// Browsers' WebSockets that closed ([`TransportHandle::lost_flows`]).
    lost: mpsc::Receiver<Flow>,
    /// Cancelled when the server starts draining: the trunk registration is then removed.
    draining: Option<CancellationToken>,
    /// Looks up the host names of outbound targets and of the trunk's registrar.
    resolver: Resolver,
    /// Owns the tasks this core starts (look-ups, connections, event deliveries).
    tasks: TaskTracker,
}

/// What `UaCore::with_screening` drops or refuses. The default screens nothing.
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

impl UaCore {
    /// `advertised` is the address put in Contact/Via (the bound address, or a configured one).
    pub fn new(
        transport: TransportHandle,
        advertised: SocketAddr,
        user_agent: String,
        app: mpsc::Sender<AppEvent>,
    ) -> UaCore {
        let (cmd_tx, commands) = mpsc::channel(4096);
        let links = transport.clone();
        let core = Core::new(
            advertised,
            transport.local_addr(),
            user_agent,
            app,
            cmd_tx,
            Box::new(move |flow: &Flow| links.is_open(flow)),
        );
        let lost = transport.lost_flows();
        UaCore {
            core,
            transport,
            commands,
            lost,
            draining: None,
            resolver: Resolver::system(),
            tasks: TaskTracker::new(),
        }
    }

    /// Look host names up with `resolver` (shared, so its cache is). Default: one of the
    /// system's configuration ([`Resolver::system`]).
    pub(crate) fn with_resolver(mut self, resolver: Resolver) -> Self {
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
    pub(crate) fn with_screening(mut self, screening: Screening, metrics: Arc<Metrics>) -> Self {
        self.core.acceptor = Acceptor::new(screening);
        self.core.metrics = Some(metrics);
        self
    }

    /// Let agents log in through this registrar: REGISTER is answered by it (and listed in
    /// `Allow`). Without one, REGISTER gets 403.
    pub(crate) fn with_registrar(mut self, registrar: Registrar) -> Self {
        self.core.agents.registrar = Some(registrar);
        self
    }

    /// Answer a `401`/`407` to an outbound INVITE sent to a target URI (a trunk: the 911 side,
    /// call-backs; not an operator's phone reached over its registration) once, with these
    /// credentials (RFC 3261 §22.2, digest as RFC 7616). Without them, or if the answer is
    /// challenged again, the leg fails with that code.
    pub(crate) fn with_trunk_auth(mut self, creds: TrunkCredentials) -> Self {
        self.core.initiator.auth = creds;
        self
    }

    /// Show the user part of outbound targets (a call-back dials the caller's number) as
    /// `log` says; call before [`UaCore::outbound`].
    pub(crate) fn with_log(mut self, log: LogConfig) -> Self {
        self.core.log = log;
        self
    }

    /// Register with the trunk as `cfg` says (see [`crate::sip::trunk`]), answering its
    /// challenges with the [`UaCore::with_trunk_auth`] credentials (so call that first), and
    /// remove the binding once `draining` is cancelled. An unusable `cfg` is refused.
    pub(crate) fn with_trunk_registration(
        mut self,
        cfg: Option<RegisterConfig>,
        draining: CancellationToken,
    ) -> Result<Self, String> {
        let Some(cfg) = cfg else { return Ok(self) };
        self.core.register_with_trunk(cfg, now())?;
        self.draining = Some(draining);
        Ok(self)
    }

    /// [`UaCore::with_registrar`] for these `(agent id, password or its hashes)` pairs, with
    /// digest realm `realm` and a random nonce secret; no agents, no registrar.
    pub(crate) fn with_agents<S: Into<AgentSecret>>(
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
    pub(crate) fn agent_events(&mut self) -> mpsc::Receiver<AgentEvent> {
        let (tx, rx) = mpsc::channel(1024);
        self.core.agents.events = Some(tx);
        rx
    }

    /// Agent id → (preferred contact URI, flow it registered over), for every agent logged in;
    /// kept current by the UA task. Read it to place an INVITE to an agent with
    /// [`OutboundHandle::invite_via`].
    pub(crate) fn agent_contacts(&self) -> Arc<DashMap<String, (String, Flow)>> {
        self.core.agents.contacts.clone()
    }

    /// Agent id → when its registration here expires, for every agent registered with this
    /// node; kept current by the UA task.
    pub(crate) fn agent_expiries(&self) -> Arc<DashMap<String, Instant>> {
        self.core.agents.expiries.clone()
    }

    pub fn stats(&self) -> Arc<UaStats> {
        self.core.stats.clone()
    }

    /// A handle for starting outbound calls; take it before [`UaCore::run`].
    pub fn outbound(&self) -> OutboundHandle {
        OutboundHandle {
            tx: self.core.commands.clone(),
            bound: self.transport.local_addr(),
            resolver: self.resolver.clone(),
            transport: self.transport.clone(),
            log: self.core.log,
        }
    }

    /// Run until cancelled or the transport closes: feed the core what comes in (messages,
    /// commands, its deadlines, the start of the drain) and carry out what it asks, in order.
    pub async fn run(mut self, mut inbound: mpsc::Receiver<Inbound>, cancel: CancellationToken) {
        let draining = self.draining.take();
        let mut unbound = draining.is_none();
        let mut heartbeat = tokio::time::interval(UA_HEARTBEAT);
        loop {
            let deadline = self.core.next_deadline();
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
                    self.core.unregister_trunk(now());
                }
                m = inbound.recv() => match m {
                    Some(m) => self.core.handle_message(now(), m.msg, m.flow),
                    None => return,
                },
                Some(c) = self.commands.recv() => self.core.handle_command(now(), c),
                Some(flow) = self.lost.recv() => self.core.flow_lost(now(), flow),
                _ = sleep => self.core.handle_timeout(now()),
                _ = heartbeat.tick() => {}
            }
            self.carry_out(&cancel).await;
            self.core.stats.heartbeat.beat(now());
            if let Some(d) = self.core.stats.heartbeat.take_stall() {
                tokio::time::sleep(d).await;
            }
            self.core.publish_counts();
        }
    }

    /// Do what the core asks, in order: sends first-come first-sent, waits in tasks of their
    /// own (on the server's tracker, stopped by `cancel`) whose results come back as commands.
    async fn carry_out(&mut self, cancel: &CancellationToken) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Transmit(flow, bytes) => self.transport.send(&flow, bytes).await,
                Action::Hold(flow) => self.transport.hold(&flow),
                Action::Release(flow) => self.transport.release(&flow),
                Action::WaitForRoom(dialog, listener) => {
                    let (cmd, cancel) = (self.core.commands.clone(), cancel.clone());
                    self.tasks.spawn(async move {
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            () = listener.room() => {
                                let _ = cmd.send(Command::Room { dialog }).await;
                            }
                        }
                    });
                }
                Action::Drain(backlog) => {
                    let cancel = cancel.clone();
                    self.tasks.spawn(async move {
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            done = tokio::time::timeout(DRAIN_WITHIN, backlog.deliver()) => {
                                if done.is_err() {
                                    warn!("a call did not take its last SIP events in time; dropped");
                                }
                            }
                        }
                    });
                }
                Action::ResolveTrunk(uri) => {
                    let (cmd, bound) = (self.core.commands.clone(), self.transport.local_addr());
                    let resolver = self.resolver.clone();
                    self.tasks.spawn(async move {
                        let found = resolver.resolve_all(&uri, bound).await;
                        let _ = cmd.send(Command::TrunkResolved(found)).await;
                    });
                }
                Action::ConnectTrunk(remote) => {
                    let (cmd, transport) = (self.core.commands.clone(), self.transport.clone());
                    self.tasks.spawn(async move {
                        let opened = transport
                            .connect_tcp(remote)
                            .await
                            .map_err(|e| format!("TCP to {remote}: {e}"));
                        let _ = cmd.send(Command::TrunkConnected(opened)).await;
                    });
                }
            }
        }
    }
}

/// The time the core is told it is (tokio's clock, so tests can pause it).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
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
