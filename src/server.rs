//! Start and stop a whole ivr311 node: SIP transports, the UA core, the call acceptor and the
//! HTTP API, each an owned task on one [`TaskTracker`] under one [`CancellationToken`].
//!
//! `main.rs` and the integration tests both start the server through [`start`], so the tests
//! run exactly what operators run (on port 0).

use crate::api::{self, ApiState};
use crate::call::MenuLoadError;
use crate::call::{self, CallContext, CallRegistry, MenuHolder};
use crate::config::{FileConfig, ServeArgs};
use crate::dispatch::queue::{spawn_dispatcher_with_history, Dispatcher, QueueHandle};
use crate::dispatch::tickets::{StoreError, TicketStore};
use crate::media::clock::MediaClock;
use crate::media::ports::PortPool;
use crate::menu::schedule::WallClock;
use crate::menu::validate::{self, LoadedMenu, MenuError, PromptIndex};
use crate::sip::registrar::AgentEvent;
use crate::sip::resolve::{DnsError, Resolver};
use crate::sip::transport::{self, TransportLimits};
use crate::sip::ua::{Screening, UaCore};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind SIP on {addr}: {source}")]
    SipBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind HTTP on {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("menu loader failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The menu does not pass `ivr311 check` (every problem, `path:line:col: message`), or
    /// the prompts could not be loaded.
    #[error("menu refused:\n{0}")]
    Menu(#[from] MenuLoadError),
    #[error("database: {0}")]
    Db(#[from] StoreError),
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Dns(#[from] DnsError),
    /// The media clock's threads could not be started.
    #[error("cannot start the media clock: {0}")]
    MediaClock(std::io::Error),
}

/// Load and check a menu against the prompts that exist (for `ivr311 check`).
/// The lines a menu's `transfer` actions name that are not `transfers` entries with
/// `crisis: true`, each with the warning `serve` logs and `check --config` prints: callers
/// sent there hear the action's announcement (e.g. "dial 988") instead of being connected.
pub fn crisis_lines_missing(
    menu: &crate::menu::schema::MenuFile,
    transfers: &crate::call::dialplan::TransfersConfig,
) -> Vec<(String, String)> {
    let plan = crate::call::dialplan::DialPlan::new(transfers, &[], &[]);
    (menu.transfer_targets().into_iter())
        .filter(|to| plan.crisis_line(to).is_none())
        .map(|to| {
            let why = format!(
                "the menu transfers callers to \"{to}\", which is not a `transfers` entry with \
                 `crisis: true`: they will hear its announcement instead"
            );
            (to.to_owned(), why)
        })
        .collect()
}

pub fn load_menu(
    path: &std::path::Path,
    prompts_dir: &std::path::Path,
) -> Result<LoadedMenu, MenuError> {
    let index = PromptIndex::from_dir(prompts_dir).map_err(|source| MenuError::Io {
        path: prompts_dir.to_owned(),
        source,
    })?;
    validate::load(path, &index)
}

/// A running node.
pub struct RunningServer {
    pub sip_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub registry: Arc<CallRegistry>,
    pub tickets: TicketStore,
    /// The menu new calls start on (replace it to reload).
    pub menu: Arc<MenuHolder>,
    /// Cancelled to refuse new calls while the ones in progress finish.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the drain time is over: calls still in a menu hear a goodbye.
    closing: CancellationToken,
    clock: Arc<MediaClock>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    drain: Duration,
    ua: Arc<crate::sip::ua::UaStats>,
    /// Writes the call history; stopped last, so every call's row is written.
    history: crate::history::HistoryWriter,
}

impl RunningServer {
    /// Graceful stop: refuse new calls (503), let calls finish for up to the drain time, then
    /// end the rest and stop every task.
    pub async fn shutdown(self) {
        self.draining.cancel();
        // The UA removes our trunk registration as the drain starts; give the removal (and
        // its challenge) time to be answered before the UA stops, or the trunk keeps sending
        // calls here until the binding lapses.
        let deadline = Instant::now() + UNBIND_TIME;
        while Instant::now() < deadline
            && self
                .ua
                .trunk_registration()
                .is_some_and(|t| t.state != "unregistered")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = Instant::now() + self.drain;
        while !self.registry.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !self.registry.is_empty() {
            // Calls still in a menu hear why they are being hung up, then get a BYE.
            info!(
                remaining = self.registry.len(),
                "drain time over; saying goodbye"
            );
            self.closing.cancel();
            let deadline = Instant::now() + GOODBYE_TIME;
            while !self.registry.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        info!(remaining = self.registry.len(), "stopping");
        self.cancel.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        self.clock.stop();
        // Every call has ended and said so: write what is still queued.
        self.history.stop().await;
    }

    /// Fault drill: stop every media clock thread for `d` (every call's audio stops), as a
    /// starved or wedged machine would; `/health/ready` must report it.
    pub fn drill_stall_media_clock(&self, d: Duration) {
        for beat in self.clock.heartbeats() {
            beat.drill_stall(d);
        }
    }

    /// Fault drill: stop the SIP UA loop for `d` (no SIP message is answered meanwhile);
    /// `/health/ready` must report it.
    pub fn drill_stall_sip_loop(&self, d: Duration) {
        self.ua.heartbeat.drill_stall(d);
    }
}

/// How long a stop waits for the trunk to answer the removal of our registration.
const UNBIND_TIME: Duration = Duration::from_secs(4);

/// How long calls get to hear the closing goodbye before the final stop.
const GOODBYE_TIME: Duration = Duration::from_secs(10);

/// Load prompts, bind sockets and start every task.
pub async fn start(args: &ServeArgs, file: FileConfig) -> Result<RunningServer, StartError> {
    start_with_clock(args, file, WallClock::system()).await
}

/// [`start`], with the civil clock the menu's schedules are read by (tests set it to the hour
/// they need; `ivr311 serve` always uses the system's).
pub async fn start_with_clock(
    args: &ServeArgs,
    file: FileConfig,
    wall_clock: WallClock,
) -> Result<RunningServer, StartError> {
    file.emergency.check().map_err(StartError::Config)?;
    let hash_problems = file.agent_hash_problems();
    if !hash_problems.is_empty() {
        return Err(StartError::Config(hash_problems.join("\n")));
    }
    file.callback
        .check()
        .map_err(|e| StartError::Config(e.to_string()))?;
    for q in &file.queues {
        q.check(&file.agents)
            .map_err(|e| StartError::Config(e.to_string()))?;
    }
    crate::call::dialplan::check_transfers(&file.transfers, &file.agents, &file.queues)
        .map_err(|e| StartError::Config(e.to_string()))?;
    file.forward
        .check(&file.webhooks)
        .map_err(|e| StartError::Config(e.to_string()))?;
    for w in file.warnings() {
        warn!("config: {w}");
    }
    let (m, p) = (args.menu.clone(), args.prompts.clone());
    let (lines, numbering) = (file.lines.clone(), file.numbering.clone());
    let menu_holder = Arc::new(
        tokio::task::spawn_blocking(move || MenuHolder::load(&m, &p, &lines, &numbering)).await??,
    );
    let menu = menu_holder.get();
    for (path, m) in menu_holder.menus().iter().skip(1) {
        info!(menu = %path.display(), menus = m.file.menus.len(), "line menu loaded");
    }
    info!(
        menu = %args.menu.display(),
        menus = menu.file.menus.len(),
        prompts = menu.prompts.len(),
        languages = ?menu.prompts.languages(),
        "menu and prompts loaded"
    );
    for (to, why) in crisis_lines_missing(&menu.file, &file.transfers) {
        warn!(line = to, "{why}");
    }
    for q in &file.queues {
        let Some(name) = &q.record_announcement else {
            continue;
        };
        let missing: Vec<String> = (menu.prompts.languages().into_iter())
            .filter(|lang| menu.prompts.get(lang, name).is_none())
            .map(|lang| lang.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(StartError::Config(format!(
                "queue {:?}: record_announcement {name:?} is not a prompt in {}",
                q.name,
                missing.join(", ")
            )));
        }
    }
    let tickets = TicketStore::open(&args.db)
        .await?
        .with_outbox(file.forward.plan(&file.webhooks));
    if let Some(mode) = crate::media::record::loose_permissions(&file.storage.recordings_dir) {
        warn!(
            dir = %file.storage.recordings_dir.display(),
            mode = format!("{mode:o}"),
            "storage.recordings_dir lets other users list callers' recordings (the files \
             themselves are 0600); chmod 700 it"
        );
    }

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (in_tx, in_rx) = mpsc::channel(8192);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let (history, history_writer) = crate::history::spawn_writer(
        tickets.pool().clone(),
        file.history.clone(),
        file.reports.clone(),
        metrics.clone(),
        tickets.outbox.clone(),
    );
    let limits = TransportLimits {
        max_message_bytes: file.limits.max_message_bytes,
        max_tcp_connections: file.limits.max_tcp_connections,
        max_tcp_connections_per_source: file.limits.max_tcp_connections_per_source,
        trusted: file.trunks.allow.clone(),
        tcp_idle: Duration::from_secs(file.limits.tcp_idle_seconds.max(1)),
        dscp: file.qos.sip_dscp,
        metrics: Some(metrics.clone()),
        ..TransportLimits::default()
    };
    let transport = transport::bind(args.sip, limits, in_tx, &tracker, cancel.clone())
        .await
        .map_err(|source| StartError::SipBind {
            addr: args.sip,
            source,
        })?;
    let sip_addr = transport.local_addr();
    // Bound to 0.0.0.0 or [::] with no advertise_ip: left unspecified, and the UA names the
    // local address that routes to each peer (an IPv6 one for IPv6 peers).
    let advertised = match file.media.advertise_ip {
        Some(ip) => SocketAddr::new(ip, sip_addr.port()),
        None => sip_addr,
    };
    let (app_tx, app_rx) = mpsc::channel(1024);
    // Cancelled when the stop begins: calls are refused and the trunk registration removed.
    let draining = CancellationToken::new();
    // One resolver for every lookup, so that its cache serves them all.
    let resolver = Resolver::new(&file.dns)?;
    let ua = UaCore::new(
        transport.clone(),
        advertised,
        format!("ivr311/{}", env!("CARGO_PKG_VERSION")),
        app_tx,
    )
    .with_resolver(resolver.clone())
    .with_tasks(tracker.clone())
    .with_agents(
        crate::sip::registrar::REALM,
        file.agents
            .iter()
            .map(|a| (a.id.clone(), a.password.clone())),
        &file.registrar.digest_algorithms,
    )
    .with_trunk_auth(file.trunks.auth.clone())
    .with_log(file.log)
    .with_trunk_registration(file.trunks.register.clone(), draining.clone())
    .map_err(StartError::Config)?
    .with_screening(
        Screening {
            trunks_allow: file.trunks.allow.clone(),
            per_second: file.limits.options_per_second,
            burst: file.limits.options_burst,
            max_calls_per_source: file.limits.max_calls_per_source,
            invites_per_second: file.limits.invites_per_second,
            invites_burst: file.limits.invites_burst,
        },
        metrics.clone(),
    );
    if let Some(reg) = &file.trunks.register {
        let ip = crate::sip::message::uri_socket_addr(&reg.registrar).map(|a| a.ip());
        if ip.is_some_and(|ip| !crate::sip::guard::allowed(&file.trunks.allow, ip)) {
            warn!(
                registrar = %reg.registrar,
                "trunks.allow does not take INVITEs from the registrar's address: calls the \
                 trunk sends from there will be dropped"
            );
        }
    }
    let mut ua = ua;
    let agent_rx = ua.agent_events();
    let agent_contacts = ua.agent_contacts();
    let agent_expiries = ua.agent_expiries();
    let ua_stats = ua.stats();
    let outbound = ua.outbound();
    tracker.spawn(ua.run(in_rx, cancel.clone()));

    crate::forward::spawn(
        tickets.clone(),
        &file.forward,
        &file.webhooks,
        &tracker,
        cancel.clone(),
    );

    let registry = Arc::new(CallRegistry::default());
    let history = {
        let registry = registry.clone();
        history.with_call_ids(Arc::new(move |id| registry.call_id(id)))
    };
    // Operators: with agents configured, a queue dispatcher fed by their registrations.
    let queues = (!file.agents.is_empty()).then(|| {
        let handle = spawn_dispatcher_with_history(
            Dispatcher::new(&file.agents, &file.queues)
                .with_callback_policy((&file.callback).into()),
            history.clone(),
            &tracker,
            cancel.clone(),
        );
        tracker.spawn(forward_agent_events(
            agent_rx,
            handle.clone(),
            cancel.clone(),
        ));
        // Nodes sharing a PostgreSQL store share their operators and lines.
        if tickets.dialect() == crate::dispatch::db::Dialect::Postgres {
            let node = format!(
                "{}/{}-{:08x}",
                args.sip,
                std::process::id(),
                rand::random::<u32>()
            );
            crate::dispatch::cluster::spawn(
                crate::dispatch::cluster::ClusterDeps {
                    store: crate::dispatch::cluster::ClusterStore::new(
                        tickets.pool().clone(),
                        node,
                    ),
                    queue: handle.clone(),
                    contacts: agent_contacts.clone(),
                    expiries: agent_expiries.clone(),
                    metrics: metrics.clone(),
                },
                &tracker,
                cancel.clone(),
            );
        }
        handle
    });
    let ports = PortPool::with_dscp(args.rtp_ports, args.sip.ip(), file.qos.rtp_dscp);
    let clock = MediaClock::start_opts(
        file.media
            .clock_threads
            .unwrap_or_else(crate::media::clock::cores),
        crate::media::clock::ClockOptions {
            realtime: file.media.realtime,
            batch_sends: file.media.batch_sends,
        },
    )
    .map_err(StartError::MediaClock)?;
    let closing = CancellationToken::new();
    let callbacks = queues.as_ref().and_then(|q| {
        crate::call::callback::Callbacks::new(
            &file.callback,
            crate::call::callback::CallbackDeps {
                history: history.clone(),
                queues: q.clone(),
                outbound: outbound.clone(),
                ports: ports.clone(),
                clock: clock.clone(),
                agent_contacts: agent_contacts.clone(),
                menu: menu_holder.clone(),
                default_language: file.media.default_language.clone(),
                tickets: tickets.clone(),
                limits: file.limits.clone(),
                log: file.log,
                tracker: tracker.clone(),
                cancel: cancel.clone(),
            },
        )
    });
    let speech = crate::media::tts::Speech::start(&file.speech);
    let announcements = Arc::new(crate::dispatch::announcements::Board::new(
        tickets.pool().clone(),
        Arc::new(speech.clone()),
        wall_clock,
    ));
    if let Err(e) = announcements.refresh().await {
        warn!(error = %e, "announcements could not be loaded; none is played until they are");
    }
    tracker.spawn(announcements.clone().run(cancel.clone()));
    let ctx = CallContext {
        registry: registry.clone(),
        ports: ports.clone(),
        limits: file.limits.clone(),
        advertise_ip: file.media.advertise_ip,
        default_language: file.media.default_language.clone(),
        answer_after: Duration::from_millis(file.media.answer_after_ms),
        menu: menu_holder.clone(),
        tickets: tickets.clone(),
        emergency: file.emergency.clone(),
        outbound,
        metrics: metrics.clone(),
        queues: queues.clone(),
        callbacks,
        agent_contacts,
        recordings: file.storage.recordings_dir.clone(),
        tracker: tracker.clone(),
        draining: draining.clone(),
        closing: closing.clone(),
        clock: clock.clone(),
        trusted: Arc::new(file.trunks.allow.clone()),
        callback: Arc::new(file.callback.clone()),
        log: file.log,
        dialplan: crate::call::dialplan::DialPlan::new(
            &file.transfers,
            &file.agents.iter().map(|a| a.id.clone()).collect::<Vec<_>>(),
            &file
                .queues
                .iter()
                .map(|q| q.name.clone())
                .collect::<Vec<_>>(),
        ),
        agent_ring: Duration::from_secs(
            file.queues
                .first()
                .map_or(
                    crate::config::QueueConfig::default().ring_timeout_seconds,
                    |q| q.ring_timeout_seconds,
                )
                .max(1),
        ),
        history: history.clone(),
        monitoring: Arc::new(crate::call::monitor::Monitoring::new(
            file.monitor.clone(),
            &file.agents,
        )),
        wall_clock,
        recorded_queues: Arc::new(
            file.queues
                .iter()
                .filter(|q| q.record)
                .map(|q| q.name.clone())
                .collect(),
        ),
        announcements: announcements.clone(),
        queue_announcements: Arc::new(
            file.queues
                .iter()
                .filter_map(|q| Some((q.name.clone(), q.record_announcement.clone()?)))
                .collect(),
        ),
        speech,
    };
    let monitors = crate::call::monitor::Monitors::new(ctx.clone(), cancel.clone());
    tracker.spawn(crate::privacy::retention::run(
        tickets.pool().clone(),
        file.storage.recordings_dir.clone(),
        (file.retention.clone(), file.history.clone()),
        wall_clock,
        cancel.clone(),
    ));
    tracker.spawn(call::accept_calls(
        app_rx,
        ctx,
        tracker.clone(),
        cancel.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .map_err(|source| StartError::HttpBind {
            addr: args.http,
            source,
        })?;
    let http_addr = listener
        .local_addr()
        .map_err(|source| StartError::HttpBind {
            addr: args.http,
            source,
        })?;
    let api_state = ApiState {
        registry: registry.clone(),
        ua: ua_stats.clone(),
        transport: transport.stats.clone(),
        started: Instant::now(),
        tickets: tickets.clone(),
        menu: menu_holder.clone(),
        open311: Arc::new(file.open311.clone()),
        admin: Arc::new(file.admin.clone()),
        metrics: metrics.clone(),
        ports: ports.clone(),
        queues,
        ready: Arc::new(
            api::health::ReadyState::new(clock.heartbeats().to_vec(), draining.clone())
                .with_outbox(
                    (file.forward.open311.is_some() || !file.webhooks.is_empty())
                        .then(|| Duration::from_secs(file.forward.stuck_after_seconds.max(1))),
                ),
        ),
        recordings: file.storage.recordings_dir.clone(),
        reports: Arc::new(file.reports.clone()),
        monitors,
        open_data: Arc::default(),
        open311_posts: Arc::new(std::sync::Mutex::new(api::ratelimit::KeyLimiter::new(
            file.open311.api_keys.len(),
            file.open311.post_rate_per_minute,
            file.open311.post_burst,
        ))),
        sip_ws: Some(api::sip_ws::SipWebSocket {
            transport: transport.clone(),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
            allowed_origins: file.http.allowed_origins.clone().into(),
        }),
        console: Arc::new(api::console::Console::new(
            file.console.clone(),
            &file.agents,
            cancel.clone(),
        )),
        supervisor: Arc::new(api::supervisor::Wallboard::new(&file.queues)),
        announcements,
    };
    tracker.spawn(api::health::watch(api_state.clone(), cancel.clone()));
    let router = api::router(api_state);
    tracker.spawn(api::serve::run(
        listener,
        router,
        (&file.http).into(),
        tracker.clone(),
        cancel.clone(),
    ));
    // Names we will send INVITEs to are looked up per call; say now if one does not resolve,
    // rather than at a 911 caller's bridge.
    let named: Vec<(&'static str, String)> = file
        .emergency
        .bridge_targets()
        .into_iter()
        .map(|u| ("emergency route", u))
        .chain(
            file.callback
                .target_for("311")
                .map(|u| ("callback.trunk_uri", u)),
        )
        .filter(|(_, uri)| crate::sip::resolve::needs_lookup(uri) && uri.starts_with("sip:"))
        .collect();
    tracker.spawn(async move {
        for (what, uri) in named {
            if let Err(why) = resolver.resolve(&uri, sip_addr).await {
                warn!(%uri, %why, "{what} does not resolve now; calls to it fail until it does");
            }
        }
    });
    info!(%sip_addr, %http_addr, "ivr311 serving");
    Ok(RunningServer {
        sip_addr,
        http_addr,
        registry,
        tickets,
        menu: menu_holder,
        draining,
        closing,
        clock,
        cancel,
        tracker,
        drain: Duration::from_secs(file.limits.drain_seconds),
        ua: ua_stats,
        history: history_writer,
    })
}

/// Agents logging in and out (REGISTER) become available or logged out in the queues.
async fn forward_agent_events(
    mut rx: mpsc::Receiver<AgentEvent>,
    queues: QueueHandle,
    cancel: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = rx.recv() => match ev { Some(ev) => ev, None => return },
        };
        match ev {
            AgentEvent::LoggedIn { agent, contact, .. } => {
                info!(%agent, %contact, "agent logged in");
                queues.agent_logged_in(&agent).await;
            }
            AgentEvent::LoggedOut { agent } => {
                info!(%agent, "agent logged out");
                queues.agent_logged_out(&agent).await;
            }
        }
    }
}
