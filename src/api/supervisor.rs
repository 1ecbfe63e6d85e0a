//! The supervisor's wallboard: the page at `/supervisor` (HTML, JavaScript and CSS embedded
//! from `web/supervisor/`) and the API it uses.
//!
//! Supervisors are agents with `role: supervisor`. They log in with the console's log-in
//! (`POST /console/login`) and its sessions, cookie and CSRF token
//! ([`super::console::authenticate`]); every route below but the page needs such a session,
//! of a supervisor (an operator's gets 403), and every request that changes state carries
//! `X-CSRF-Token` and `Content-Type: application/json`.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/supervisor` | the page (plus `/supervisor/supervisor.js`, `/supervisor/supervisor.css`) |
//! | GET | `/supervisor/api/session` | the supervisor, the session's `csrf_token`, the not-ready reasons, whether monitoring is served |
//! | POST | `/supervisor/api/logout` | end the session (the supervisor's own state in the queues is left as it is) |
//! | GET | `/supervisor/api/wallboard` | the wallboard now ([`Board`]) |
//! | GET | `/supervisor/events` | server-sent events: `snapshot` (a [`Board`]) at once, then whenever it changes (at most 4 a second; the waits tick every second) |
//! | GET | `/supervisor/api/reports/calls` | the calls report, as `/admin/reports/calls` answers it (for the charts) |
//! | POST | `/supervisor/api/agents/{id}/state` | force an agent's state: `{"state": "ready"}`, `{"state": "not_ready", "reason"}`, `{"state": "logged_out"}` |
//! | POST | `/supervisor/api/calls/{call}/hangup` | hang up a call (`call` is the queue's caller id in the wallboard) |
//! | POST | `/supervisor/api/calls/{call}/transfer` | `{"to"}`: the transfer the console's buttons start (911, a `transfers` line, an agent, a queue) |
//! | GET | `/supervisor/api/transfers/{id}` | a transfer's progress |
//!
//! The wallboard names no caller's number: callers are ids, waits and queues.
//!
//! Figures from the call history (today's, and the last 15 minutes' for the alarm) are read
//! at most every [`HISTORY_FRESH_FOR`], whatever the number of supervisors watching.
//!
//! It must not touch SIP or media: it reads and asks the queue ([`QueueHandle`]), the call
//! history and the call registry.

use super::console::{self, SessionAgent};
use super::ApiState;
use crate::config::{AgentRole, QueueConfig};
use crate::dispatch::queue::{AgentNotice, AgentView, QueueHandle, WaitingView};
use crate::history::report::{self, CallsRow, Interval, Range};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use tracing::{info, warn};

const PAGE: &str = include_str!("../../web/supervisor/index.html");
const SCRIPT: &str = include_str!("../../web/supervisor/supervisor.js");
const STYLE: &str = include_str!("../../web/supervisor/supervisor.css");

/// How long figures read from the call history are reused.
pub const HISTORY_FRESH_FOR: Duration = Duration::from_secs(2);
/// The window of the service-level alarm.
pub const ALARM_WINDOW: Duration = Duration::from_secs(15 * 60);
/// An event stream looks for changes this often (a queue or agent notice marks it changed).
const STREAM_TICK: Duration = Duration::from_millis(250);
/// With no notice, the wallboard is rebuilt this often (waits and times in state tick).
const STREAM_REFRESH: Duration = Duration::from_secs(1);
/// How often an event stream checks that its session still exists.
const STREAM_CHECK: Duration = Duration::from_secs(10);
const DAY_MS: i64 = 86_400_000;

/// A queue's targets, from `queues[]` and `reports`.
#[derive(Debug, Clone, PartialEq)]
struct Targets {
    service_level_seconds: u64,
    service_level_target: f64,
    max_wait_alarm: u64,
}

/// The wallboard's shared state.
pub struct Wallboard {
    queues: HashMap<String, QueueConfig>,
    /// Whether `POST /supervisor/api/calls/{call}/monitor` is served (listen, whisper, barge).
    monitoring: bool,
    // An async mutex held across the queries on purpose: one stream reads the history, the
    // others wait for that result.
    history: tokio::sync::Mutex<Option<(Instant, Arc<HistoryFigures>)>>,
}

impl std::fmt::Debug for Wallboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wallboard")
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl Wallboard {
    pub fn new(queues: &[QueueConfig]) -> Self {
        Wallboard {
            queues: queues.iter().map(|q| (q.name.clone(), q.clone())).collect(),
            monitoring: true,
            history: tokio::sync::Mutex::new(None),
        }
    }

    fn targets(&self, queue: &str, reports: &report::ReportsConfig) -> Targets {
        let defaults = QueueConfig::default();
        let q = self.queues.get(queue).unwrap_or(&defaults);
        Targets {
            service_level_seconds: reports
                .queue_service_level_seconds
                .get(queue)
                .copied()
                .unwrap_or(reports.service_level_seconds),
            service_level_target: q.service_level_target,
            max_wait_alarm: q.max_wait_alarm,
        }
    }
}

/// Figures of one queue (or all) over a span, from the call history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub calls: u64,
    pub offered: u64,
    pub answered: u64,
    pub abandoned: u64,
    pub short_abandoned: u64,
    pub answered_within_target: u64,
    /// As the calls report: answered_within_target ÷ (offered − short_abandoned).
    pub service_level: Option<f64>,
    /// abandoned ÷ offered.
    pub abandon_rate: Option<f64>,
    pub asa_seconds: Option<f64>,
    pub longest_wait_seconds: f64,
}

impl From<&CallsRow> for Figures {
    fn from(r: &CallsRow) -> Self {
        Figures {
            calls: r.calls,
            offered: r.offered,
            answered: r.answered,
            abandoned: r.abandoned,
            short_abandoned: r.short_abandoned,
            answered_within_target: r.answered_within_target,
            service_level: r.service_level,
            abandon_rate: (r.offered > 0).then(|| r.abandoned as f64 / r.offered as f64),
            asa_seconds: r.asa_seconds,
            longest_wait_seconds: r.longest_wait_seconds,
        }
    }
}

/// What the history says: today (UTC) in all, and per queue today and over the last
/// [`ALARM_WINDOW`].
#[derive(Debug, Clone, Default, PartialEq)]
struct HistoryFigures {
    today: Option<Figures>,
    today_by_queue: HashMap<String, Figures>,
    recent_by_queue: HashMap<String, Figures>,
}

/// One queue on the wallboard.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueBoard {
    pub name: String,
    /// Callers waiting now (call-backs keeping their place included).
    pub waiting: usize,
    pub longest_wait_seconds: u64,
    /// The callers waiting, in the order they are served.
    pub callers: Vec<WaitingView>,
    /// Members ready for a call now.
    pub agents_ready: usize,
    /// Members logged in (ready, ringing, on a call, in wrap-up, paused).
    pub agents_logged_in: usize,
    pub service_level_seconds: u64,
    pub service_level_target: f64,
    /// 0: no alarm for long waits.
    pub max_wait_alarm_seconds: u64,
    /// Today (UTC) from the call history.
    pub today: Option<Figures>,
    /// The last 15 minutes from the call history.
    pub last_15_minutes: Option<Figures>,
}

/// Something a supervisor should act on.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Alarm {
    /// The queue's service level over the last 15 minutes is under its target.
    ServiceLevel {
        queue: String,
        service_level: f64,
        target: f64,
    },
    /// A caller has waited `max_wait_alarm` seconds or more.
    LongWait {
        queue: String,
        caller: u64,
        waited_seconds: u64,
        threshold_seconds: u64,
    },
    /// Callers wait (no agent's phone ringing for them) and none of the queue's agents is
    /// ready.
    NoAgentReady { queue: String, waiting: usize },
}

/// One agent on the wallboard.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentBoard {
    #[serde(flatten)]
    pub agent: AgentView,
    pub role: AgentRole,
}

/// The wallboard (`GET /supervisor/api/wallboard`, the `snapshot` event).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Board {
    pub queues: Vec<QueueBoard>,
    pub agents: Vec<AgentBoard>,
    /// Today (UTC) in all queues, from the call history (as `/admin/reports/calls` for
    /// today); `null` while the history cannot be read.
    pub today: Option<Figures>,
    pub alarms: Vec<Alarm>,
}

/// The alarms the queues raise (see [`Alarm`]).
pub fn alarms(queues: &[QueueBoard]) -> Vec<Alarm> {
    let mut out = Vec::new();
    for q in queues {
        if let Some(sl) = q.last_15_minutes.as_ref().and_then(|f| f.service_level) {
            if sl < q.service_level_target {
                out.push(Alarm::ServiceLevel {
                    queue: q.name.clone(),
                    service_level: sl,
                    target: q.service_level_target,
                });
            }
        }
        // Callers an agent's phone rings for are being served.
        let unserved = q.callers.iter().filter(|c| c.ringing.is_none()).count();
        if unserved > 0 && q.agents_ready == 0 {
            out.push(Alarm::NoAgentReady {
                queue: q.name.clone(),
                waiting: unserved,
            });
        }
        if q.max_wait_alarm_seconds > 0 {
            out.extend(
                q.callers
                    .iter()
                    .filter(|c| c.waited_seconds >= q.max_wait_alarm_seconds)
                    .map(|c| Alarm::LongWait {
                        queue: q.name.clone(),
                        caller: c.caller,
                        waited_seconds: c.waited_seconds,
                        threshold_seconds: q.max_wait_alarm_seconds,
                    }),
            );
        }
    }
    out
}

/// Midnight (UTC) of the day holding `now_ms`.
fn midnight(now_ms: i64) -> i64 {
    now_ms - now_ms.rem_euclid(DAY_MS)
}

async fn read_history(s: &ApiState, queues: &[String]) -> HistoryFigures {
    let now = crate::history::epoch_ms_now();
    let day = Range {
        from_ms: midnight(now),
        to_ms: midnight(now) + DAY_MS,
        interval: Interval::Day,
        queue: None,
    };
    let recent = Range {
        from_ms: now - ALARM_WINDOW.as_millis() as i64,
        to_ms: now + 1,
        interval: Interval::Day,
        queue: None,
    };
    let pool = s.tickets.pool();
    let mut h = HistoryFigures::default();
    match report::calls(pool, &s.reports, &day).await {
        Ok(r) => h.today = Some(Figures::from(&r.total)),
        Err(e) => warn!(error = %e, "the wallboard could not read today's calls"),
    }
    for q in queues {
        let one = |r: &Range| Range {
            queue: Some(q.clone()),
            ..r.clone()
        };
        if let Ok(r) = report::calls(pool, &s.reports, &one(&day)).await {
            h.today_by_queue.insert(q.clone(), Figures::from(&r.total));
        }
        if let Ok(r) = report::calls(pool, &s.reports, &one(&recent)).await {
            h.recent_by_queue.insert(q.clone(), Figures::from(&r.total));
        }
    }
    h
}

async fn history(s: &ApiState, queues: &[String]) -> Arc<HistoryFigures> {
    let mut last = s.supervisor.history.lock().await;
    if let Some((at, h)) = last.as_ref() {
        let covers = queues.iter().all(|q| h.today_by_queue.contains_key(q));
        if at.elapsed() < HISTORY_FRESH_FOR && (covers || h.today.is_none()) {
            return h.clone();
        }
    }
    let h = Arc::new(read_history(s, queues).await);
    *last = Some((Instant::now(), h.clone()));
    h
}

/// The wallboard now.
async fn board(s: &ApiState, q: &QueueHandle) -> Board {
    let figures = q.figures().await;
    let agents = q.agents().await;
    let waiting = q.waiting().await;
    let names: Vec<String> = figures.iter().map(|f| f.name.clone()).collect();
    let h = history(s, &names).await;
    let queues: Vec<QueueBoard> = figures
        .into_iter()
        .map(|f| {
            let t = s.supervisor.targets(&f.name, &s.reports);
            let a = &f.agents;
            QueueBoard {
                callers: waiting
                    .iter()
                    .filter(|w| w.queue == f.name)
                    .cloned()
                    .collect(),
                waiting: f.waiting,
                longest_wait_seconds: f.longest_wait.as_secs(),
                agents_ready: a.available,
                agents_logged_in: a.available
                    + a.ringing
                    + a.on_call
                    + a.wrap_up
                    + a.no_answer_pause
                    + a.paused,
                service_level_seconds: t.service_level_seconds,
                service_level_target: t.service_level_target,
                max_wait_alarm_seconds: t.max_wait_alarm,
                today: h.today_by_queue.get(&f.name).cloned(),
                last_15_minutes: h.recent_by_queue.get(&f.name).cloned(),
                name: f.name,
            }
        })
        .collect();
    Board {
        alarms: alarms(&queues),
        queues,
        agents: agents
            .into_iter()
            .map(|a| AgentBoard {
                role: s.console.role(&a.id).unwrap_or_default(),
                agent: a,
            })
            .collect(),
        today: h.today.clone(),
    }
}

/// The wallboard's routes.
pub fn router(state: ApiState) -> Router<ApiState> {
    let api = Router::new()
        .route("/supervisor/api/session", get(session_info))
        .route("/supervisor/api/logout", post(logout))
        .route("/supervisor/api/wallboard", get(wallboard))
        .route("/supervisor/events", get(events))
        .route("/supervisor/api/reports/calls", get(super::reports::calls))
        .route("/supervisor/api/agents/{id}/state", post(force_state))
        .route("/supervisor/api/calls/{call}/hangup", post(hangup))
        .route("/supervisor/api/calls/{call}/transfer", post(transfer))
        .route("/supervisor/api/calls/{call}/monitor", post(monitor))
        .route("/supervisor/api/transfers/{id}", get(transfer_progress))
        .route_layer(middleware::from_fn_with_state(state, guard));
    Router::new()
        .route("/supervisor", get(page))
        .route("/supervisor/", get(page))
        .route("/supervisor/supervisor.js", get(script))
        .route("/supervisor/supervisor.css", get(style))
        .merge(api)
}

/// A console session of a supervisor (403 for an operator's).
async fn guard(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    let agent = match console::authenticate(&s, &req) {
        Ok(a) => a,
        Err(why) => return why.into_response(),
    };
    if s.console.role(&agent.id) != Some(AgentRole::Supervisor) {
        warn!(agent = %agent.id, path = req.uri().path(), "an operator's session refused on the wallboard");
        return console::error(StatusCode::FORBIDDEN, "the wallboard is for supervisors");
    }
    req.extensions_mut().insert(agent);
    next.run(req).await
}

async fn page() -> Response {
    console::html_page(PAGE)
}

async fn script() -> Response {
    console::asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    console::asset("text/css; charset=utf-8", STYLE)
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Why a wallboard request was refused before its handler could act.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// The server has no agents, hence no queues (404).
    #[error("no operators are configured")]
    NoOperators,
    /// A call id in the path that is not one (400).
    #[error("{0:?} is not a call id of the wallboard")]
    NotACallId(String),
}

impl IntoResponse for SupervisorError {
    fn into_response(self) -> Response {
        let code = match self {
            SupervisorError::NoOperators => StatusCode::NOT_FOUND,
            SupervisorError::NotACallId(_) => StatusCode::BAD_REQUEST,
        };
        console::error(code, self.to_string())
    }
}

fn queues(s: &ApiState) -> Result<&QueueHandle, SupervisorError> {
    s.queues.as_ref().ok_or(SupervisorError::NoOperators)
}

async fn session_info(
    State(s): State<ApiState>,
    Extension(me): Extension<SessionAgent>,
) -> Response {
    let csrf = s
        .console
        .lock_sessions()
        .touch(Instant::now(), &me.token)
        .map(|x| x.csrf);
    no_store(
        Json(json!({
            "agent": me.id,
            "role": AgentRole::Supervisor,
            "csrf_token": csrf,
            "not_ready_reasons": s.console.not_ready_reasons(),
            "monitoring": s.supervisor.monitoring,
        }))
        .into_response(),
    )
}

async fn logout(State(s): State<ApiState>, Extension(me): Extension<SessionAgent>) -> Response {
    s.console.lock_sessions().remove(&me.token);
    info!(supervisor = %me.id, "supervisor logged out of the wallboard");
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        console::set_cookie(&s.console, "", Some(0)),
    );
    r
}

async fn wallboard(State(s): State<ApiState>) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    no_store(Json(board(&s, &q).await).into_response())
}

/// The `events` stream's state.
struct Stream {
    s: ApiState,
    q: QueueHandle,
    me: SessionAgent,
    rx: broadcast::Receiver<AgentNotice>,
    /// The last board sent.
    last: Option<Board>,
    built: Instant,
    dirty: bool,
    tick: tokio::time::Interval,
    checked: Instant,
    done: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.s
            .console
            .lock_sessions()
            .stream_closed(Instant::now(), &self.me.token);
    }
}

impl Stream {
    /// The board, if it changed since the last one sent.
    async fn next_board(&mut self) -> Option<Board> {
        self.built = Instant::now();
        self.dirty = false;
        let b = board(&self.s, &self.q).await;
        if self.last.as_ref() == Some(&b) {
            return None;
        }
        self.last = Some(b.clone());
        Some(b)
    }
}

/// `GET /supervisor/events`: a `snapshot` at once, then again whenever the wallboard changes.
async fn events(State(s): State<ApiState>, Extension(me): Extension<SessionAgent>) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    if !s
        .console
        .lock_sessions()
        .stream_opened(Instant::now(), &me.token)
    {
        return console::error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many event streams open for this session",
        );
    }
    let cancel = s.console.cancel().clone();
    let mut tick = tokio::time::interval(STREAM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let now = Instant::now();
    let st = Stream {
        rx: q.notices(),
        q,
        s,
        me,
        last: None,
        built: now,
        dirty: true,
        tick,
        checked: now,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, move |mut st| {
        let cancel = cancel.clone();
        async move {
            loop {
                if st.done {
                    return None;
                }
                if st.dirty || st.built.elapsed() >= STREAM_REFRESH {
                    if let Some(b) = st.next_board().await {
                        let ev = console::event("snapshot", &b);
                        return Some((Ok::<Event, Infallible>(ev), st));
                    }
                }
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    r = st.rx.recv() => match r {
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => st.dirty = true,
                        Err(broadcast::error::RecvError::Closed) => st.done = true,
                    },
                    _ = st.tick.tick() => {
                        if st.checked.elapsed() >= STREAM_CHECK {
                            st.checked = Instant::now();
                            let alive = st
                                .s
                                .console
                                .lock_sessions()
                                .touch(Instant::now(), &st.me.token)
                                .is_some();
                            if !alive {
                                st.done = true;
                            }
                        }
                    }
                }
            }
        }
    });
    no_store(
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
    )
}

async fn force_state(
    State(s): State<ApiState>,
    Extension(me): Extension<SessionAgent>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    let b: console::SetState = match console::parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let req = match b.request(s.console.not_ready_reasons()) {
        Ok(req) => req,
        Err(why) => return console::error(StatusCode::BAD_REQUEST, why),
    };
    let what = format!("{req:?}");
    match q.agent_request(&id, req).await {
        Ok(()) => {
            warn!(supervisor = %me.id, agent = %id, request = %what, "supervisor forced an agent's state");
            let view = q.agents().await.into_iter().find(|a| a.id == id);
            Json(view).into_response()
        }
        Err(why) => console::refusal(why),
    }
}

fn call_in_path(call: &str) -> Result<u64, SupervisorError> {
    call.parse::<u64>()
        .map_err(|_| SupervisorError::NotACallId(call.to_owned()))
}

async fn hangup(
    State(s): State<ApiState>,
    Extension(me): Extension<SessionAgent>,
    Path(call): Path<String>,
) -> Response {
    let call = match call_in_path(&call) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if s.registry.hangup_id(call) {
        warn!(supervisor = %me.id, caller = call, "supervisor hung up a call");
        StatusCode::NO_CONTENT.into_response()
    } else {
        console::error(
            StatusCode::NOT_FOUND,
            "no live call with this id (it ended, or it is a call-back between dials)",
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Transfer {
    to: String,
}

async fn transfer(
    State(s): State<ApiState>,
    Extension(me): Extension<SessionAgent>,
    Path(call): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let call = match call_in_path(&call) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let b: Transfer = match console::parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let Some(call_id) = s.registry.call_id(call) else {
        return console::error(StatusCode::NOT_FOUND, "no live call with this id");
    };
    match s
        .registry
        .transfer_via(&call_id, &b.to, crate::call::TransferVia::Supervisor)
        .await
    {
        Ok(id) => {
            info!(supervisor = %me.id, caller = call, to = %b.to, transfer = id, "supervisor transfers a call");
            (
                StatusCode::ACCEPTED,
                Json(json!({ "transfer_id": id, "progress": format!("/supervisor/api/transfers/{id}") })),
            )
                .into_response()
        }
        Err((code, why)) => console::error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT),
            why,
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Monitor {
    mode: crate::media::mix::MonitorMode,
    /// The page's token for this request, sent back in the INVITE (`X-311-Monitor-Token`)
    /// so that the wallboard answers that INVITE, and no other, by itself.
    #[serde(default)]
    token: Option<crate::call::monitor::MonitorToken>,
}

/// Listen, whisper or barge on an operator's call: the server calls the supervisor's own
/// registered phone (a desk phone, or a browser registered over `/sip`, offered WebRTC) and
/// joins it to the call when it answers ([`crate::call::monitor`]). The session's agent is the supervisor:
/// nobody can have another person's phone called in.
async fn monitor(
    State(s): State<ApiState>,
    Extension(me): Extension<SessionAgent>,
    Path(call): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let call = match call_in_path(&call) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let b: Monitor = match console::parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let Some(call_id) = s.registry.call_id(call) else {
        return console::error(StatusCode::NOT_FOUND, "no live call with this id");
    };
    let request = crate::call::monitor::MonitorBody {
        mode: b.mode,
        supervisor: me.id.clone(),
        token: b.token,
    };
    match s.monitors.start(&call_id, &request).await {
        Ok(()) => {
            info!(supervisor = %me.id, caller = call, mode = ?b.mode, "supervisor joins a call");
            (
                StatusCode::ACCEPTED,
                Json(json!({ "status": "calling your phone" })),
            )
                .into_response()
        }
        Err((code, why)) => console::error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT),
            why,
        ),
    }
}

async fn transfer_progress(State(s): State<ApiState>, Path(id): Path<u64>) -> Response {
    match s.registry.transfer_info(id) {
        Some(t) => Json(t).into_response(),
        None => console::error(StatusCode::NOT_FOUND, "no such transfer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(waits: &[u64], ready: usize, recent_sl: Option<f64>) -> QueueBoard {
        QueueBoard {
            name: "general".into(),
            waiting: waits.len(),
            longest_wait_seconds: waits.iter().copied().max().unwrap_or(0),
            callers: waits
                .iter()
                .enumerate()
                .map(|(i, w)| WaitingView {
                    caller: i as u64 + 1,
                    queue: "general".into(),
                    waited_seconds: *w,
                    callback: false,
                    ringing: None,
                })
                .collect(),
            agents_ready: ready,
            agents_logged_in: ready + 1,
            service_level_seconds: 30,
            service_level_target: 0.8,
            max_wait_alarm_seconds: 120,
            today: None,
            last_15_minutes: recent_sl.map(|sl| Figures {
                calls: 10,
                offered: 10,
                answered: 8,
                abandoned: 2,
                short_abandoned: 0,
                answered_within_target: 7,
                service_level: Some(sl),
                abandon_rate: Some(0.2),
                asa_seconds: Some(12.0),
                longest_wait_seconds: 60.0,
            }),
        }
    }

    #[test]
    fn no_alarm_when_the_queue_is_within_its_targets() {
        assert_eq!(alarms(&[queue(&[10, 119], 1, Some(0.8))]), vec![]);
        assert_eq!(alarms(&[queue(&[], 0, None)]), vec![]);
    }

    #[test]
    fn each_alarm_is_raised_by_its_own_condition() {
        assert_eq!(
            alarms(&[queue(&[], 1, Some(0.7))]),
            vec![Alarm::ServiceLevel {
                queue: "general".into(),
                service_level: 0.7,
                target: 0.8
            }]
        );
        assert_eq!(
            alarms(&[queue(&[5], 0, None)]),
            vec![Alarm::NoAgentReady {
                queue: "general".into(),
                waiting: 1
            }]
        );
        assert_eq!(
            alarms(&[queue(&[5, 120], 2, None)]),
            vec![Alarm::LongWait {
                queue: "general".into(),
                caller: 2,
                waited_seconds: 120,
                threshold_seconds: 120
            }]
        );
        let mut rung = queue(&[5], 0, None);
        rung.callers[0].ringing = Some("1001".into());
        assert_eq!(alarms(&[rung]), vec![]);
        let mut off = queue(&[500], 2, None);
        off.max_wait_alarm_seconds = 0;
        assert_eq!(alarms(&[off]), vec![]);
    }

    #[test]
    fn today_starts_at_midnight_utc() {
        assert_eq!(midnight(1_795_996_800_000 + 3_600_000), 1_795_996_800_000);
        assert_eq!(midnight(1_795_996_800_000), 1_795_996_800_000);
    }
}
