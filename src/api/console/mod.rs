//! The operator console: the page at `/console` (HTML, JavaScript and CSS embedded from
//! `web/console/`) and the HTTP API it uses, which a CRM integration can use the same way.
//!
//! An operator logs in with their agent id and password (the registrar's secret: the plain
//! password, or its `password_ha1` hashes); the server keeps the session
//! ([`session::Sessions`]) and gives the browser an `HttpOnly`, `SameSite=Strict` cookie
//! (`Secure` with `console.secure_cookies`) and a CSRF token, which every request that changes
//! state must carry in `X-CSRF-Token` (with `Content-Type: application/json`). Every action is
//! on the session's own agent and its own offer or call: no route names another agent.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/console` | the page (plus `/console/console.js`, `/console/audio.js`, `/console/console.css`; JsSIP at `/console/assets/jssip.min.js`) |
//! | POST | `/console/login` | `{"agent", "password"}` → the session (cookie) and its `csrf_token` |
//! | POST | `/console/logout` | sign the agent off (out of the queues; after the current call) and end the session |
//! | GET | `/console/api/session` | the agent, its state, the offer or call with the caller's context and history, the not-ready reasons, the services |
//! | GET | `/console/events` | server-sent events: `snapshot`, `state`, `offer`, `call_ended` |
//! | POST | `/console/api/state` | `{"state": "ready"}`, `{"state": "not_ready", "reason"}`, `{"state": "logged_out"}` |
//! | POST | `/console/api/wrap-up/end`, `/console/api/wrap-up/extend` | end wrap-up now; add `{"seconds"}` (default `console.wrap_up_extend_seconds`) |
//! | POST | `/console/api/offer/decline` | `{"caller"}`: decline the offer ringing (as if unanswered) |
//! | POST | `/console/api/call/hangup` | hang up the call the agent is on (the caller's side too) |
//! | POST | `/console/api/call/transfer` | `{"to": "911"}`: send the caller to 911 the way the menu does (`emergency:`), audited; the agent's leg ends |
//! | GET | `/console/api/services` | the loaded menu's services (as Open311 lists them) |
//! | POST | `/console/api/requests` | file a ticket: `channel: operator`, the agent's id, the caller's number and call from the agent's current call |
//! | GET | `/console/api/requests/{id}` | one ticket, with the caller's details |
//! | POST | `/console/api/requests/{id}` | `{"status", "status_notes"}` |
//!
//! It must not touch SIP or media: it reads and asks the queue ([`QueueHandle`]), the ticket
//! store and the call registry.

pub mod session;

use crate::api::ApiState;
use crate::dispatch::queue::{
    AgentConsoleView, AgentNotice, AgentRequest, OfferView, QueueHandle, RequestRefusal,
};
use crate::dispatch::tickets::{Channel, NewTicket, Status, Ticket};
use crate::sip::registrar::{AgentSecret, PasswordHa1, REALM};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use session::{LoginLimiter, Sessions};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The session cookie's name.
pub const COOKIE: &str = "ivr311_console";
/// The header that carries the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How many of a caller's earlier requests an offer shows.
const HISTORY_ROWS: u32 = 20;
/// Longest `description` or `status_notes` accepted, in characters.
const MAX_TEXT: usize = 4000;
/// Longest `address` accepted, in characters.
const MAX_ADDRESS: usize = 200;
/// How often an event stream checks that its session still exists.
const STREAM_CHECK: Duration = Duration::from_secs(10);

const PAGE: &str = include_str!("../../../web/console/index.html");
const SCRIPT: &str = include_str!("../../../web/console/console.js");
const AUDIO: &str = include_str!("../../../web/console/audio.js");
const STYLE: &str = include_str!("../../../web/console/console.css");

/// The `console:` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Reasons an operator can give for Not ready. Default
    /// `[break, lunch, training, after_call_work]`.
    pub not_ready_reasons: Vec<String>,
    /// A session with no request and no open event stream for this long ends. Default 1800.
    pub session_idle_seconds: u64,
    /// Most console sessions at once; past it the least recently used ends. Default 256.
    pub max_sessions: usize,
    /// Mark the session cookie `Secure`: set it when operators reach the console over HTTPS
    /// (a TLS-terminating proxy in front of `--http`). Default false.
    pub secure_cookies: bool,
    /// Failed log-ins per agent id, and per source address, within `login_window_seconds`
    /// after which log-ins are refused (429 with `Retry-After`). Default 5.
    pub login_max_failures: u32,
    /// Default 300.
    pub login_window_seconds: u64,
    /// Seconds one "extend wrap-up" adds when the request names none. Default 60.
    pub wrap_up_extend_seconds: u64,
    /// How many days back a caller's earlier requests are shown. Default 90.
    pub history_days: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            not_ready_reasons: ["break", "lunch", "training", "after_call_work"]
                .map(String::from)
                .to_vec(),
            session_idle_seconds: 1800,
            max_sessions: 256,
            secure_cookies: false,
            login_max_failures: 5,
            login_window_seconds: 300,
            wrap_up_extend_seconds: 60,
            history_days: 90,
        }
    }
}

/// An operator who may log in.
#[derive(Debug, Clone)]
struct Operator {
    name: Option<String>,
    secret: AgentSecret,
    role: crate::config::AgentRole,
}

/// The console's shared state.
pub struct Console {
    config: ConsoleConfig,
    operators: HashMap<String, Operator>,
    sessions: Mutex<Sessions>,
    limiter: Mutex<LoginLimiter>,
    /// Ends event streams at shutdown (they would hold a graceful stop open).
    cancel: CancellationToken,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("operators", &self.operators.len())
            .finish()
    }
}

impl Console {
    pub fn new(
        config: ConsoleConfig,
        agents: &[crate::config::AgentConfig],
        cancel: CancellationToken,
    ) -> Self {
        let operators = agents
            .iter()
            .map(|a| {
                (
                    a.id.clone(),
                    Operator {
                        name: a.name.clone(),
                        secret: a.password.clone(),
                        role: a.role,
                    },
                )
            })
            .collect();
        Console {
            sessions: Mutex::new(Sessions::new(
                config.max_sessions,
                Duration::from_secs(config.session_idle_seconds),
            )),
            limiter: Mutex::new(LoginLimiter::new(
                config.login_max_failures,
                Duration::from_secs(config.login_window_seconds),
            )),
            config,
            operators,
            cancel,
        }
    }

    /// The role `agent` has in the config (`None`: no such agent).
    pub(crate) fn role(&self, agent: &str) -> Option<crate::config::AgentRole> {
        self.operators.get(agent).map(|o| o.role)
    }

    /// The not-ready reasons an operator (or a supervisor for them) may give.
    pub(crate) fn not_ready_reasons(&self) -> &[String] {
        &self.config.not_ready_reasons
    }

    /// Ends event streams at shutdown.
    pub(crate) fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    pub(crate) fn lock_sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_limiter(&self) -> std::sync::MutexGuard<'_, LoginLimiter> {
        self.limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `password` is `agent`'s. An unknown agent is checked against a dummy secret,
    /// so the time taken does not say which ids exist.
    fn check_password(&self, agent: &str, password: &str) -> bool {
        let Some(op) = self.operators.get(agent) else {
            let _ = crate::api::same_secret(password, "ivr311 no such agent");
            return false;
        };
        match &op.secret {
            AgentSecret::Password(p) => !p.is_empty() && crate::api::same_secret(password, p),
            AgentSecret::Ha1(h) => {
                let given = PasswordHa1::of(agent, REALM, password);
                match (&h.sha256, &h.md5) {
                    (Some(want), _) => given
                        .sha256
                        .is_some_and(|g| crate::api::same_secret(&g, want)),
                    (None, Some(want)) => {
                        given.md5.is_some_and(|g| crate::api::same_secret(&g, want))
                    }
                    (None, None) => false,
                }
            }
        }
    }
}

/// The console's routes.
pub fn router(state: ApiState) -> Router<ApiState> {
    let api = Router::new()
        .route("/console/logout", post(logout))
        .route("/console/events", get(events))
        .route("/console/api/session", get(session_info))
        .route("/console/api/state", post(set_state))
        .route("/console/api/wrap-up/end", post(wrap_up_end))
        .route("/console/api/wrap-up/extend", post(wrap_up_extend))
        .route("/console/api/offer/decline", post(decline))
        .route("/console/api/call/hangup", post(hangup))
        .route("/console/api/call/transfer", post(transfer))
        .route("/console/api/transfers/{id}", get(transfer_progress))
        .route("/console/api/services", get(services))
        .route("/console/api/requests", post(file_request))
        .route(
            "/console/api/requests/{id}",
            get(get_request).post(update_request),
        )
        .route_layer(middleware::from_fn_with_state(state, guard));
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/console.js", get(script))
        .route("/console/audio.js", get(audio_script))
        .route("/console/console.css", get(style))
        .route("/console/login", post(login))
        .merge(api)
}

/// The session a request runs under (put there by `guard`).
#[derive(Debug, Clone)]
pub(crate) struct SessionAgent {
    pub(crate) id: String,
    /// The session's token (the cookie's value).
    pub(crate) token: String,
}

type Agent = SessionAgent;

pub(crate) fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    let msg: String = msg.into();
    (code, Json(json!({ "error": msg }))).into_response()
}

/// The session cookie's value.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// Whether the body is declared JSON (`application/json`, parameters allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Why a request was refused its session (see [`authenticate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// No session cookie (401).
    #[error("log in first")]
    NoSession,
    /// The cookie names no live session (401).
    #[error("the session has ended; log in again")]
    Ended,
    /// A request that changes state without the session's CSRF token (403).
    #[error("missing or wrong X-CSRF-Token")]
    Csrf,
    /// A request that changes state not declared JSON (415).
    #[error("requests that change state need Content-Type: application/json")]
    NotJson,
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let code = match self {
            AuthError::NoSession | AuthError::Ended => StatusCode::UNAUTHORIZED,
            AuthError::Csrf => StatusCode::FORBIDDEN,
            AuthError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        };
        error(code, self.to_string())
    }
}

/// The live session a request carries and, for a request that changes state, its CSRF token
/// and a JSON body: the session's agent and token, or why not.
pub(crate) fn authenticate(s: &ApiState, req: &Request) -> Result<SessionAgent, AuthError> {
    let token = cookie(req.headers()).ok_or(AuthError::NoSession)?;
    let session = s
        .console
        .lock_sessions()
        .touch(Instant::now(), &token)
        .ok_or(AuthError::Ended)?;
    let reads = req.method() == Method::GET || req.method() == Method::HEAD;
    if !reads {
        let given = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !crate::api::same_secret(given, &session.csrf) {
            warn!(agent = %session.agent, path = req.uri().path(), "console request without its CSRF token refused");
            return Err(AuthError::Csrf);
        }
        if !is_json(req.headers()) {
            return Err(AuthError::NotJson);
        }
    }
    Ok(SessionAgent {
        id: session.agent,
        token,
    })
}

/// Runs before every route but the page and the log-in: a live session, and for a request
/// that changes state, JSON and the session's CSRF token.
async fn guard(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    match authenticate(&s, &req) {
        Ok(agent) => {
            req.extensions_mut().insert(agent);
            next.run(req).await
        }
        Err(why) => why.into_response(),
    }
}

pub(crate) fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    html_page(PAGE)
}

/// A page with the console's security headers (CSP: same origin only, no framing).
pub(crate) fn html_page(body: &'static str) -> Response {
    let mut r = asset("text/html; charset=utf-8", body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             media-src 'self' blob: data:; connect-src 'self' ws: wss:; object-src 'none'; \
             base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn audio_script() -> Response {
    asset("text/javascript; charset=utf-8", AUDIO)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// Why a console request was refused before its handler could act.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The JSON body does not fit the route (400).
    #[error("body: {0}")]
    Body(#[from] serde_json::Error),
    /// The server has no agents, hence no queues (404).
    #[error("no operators are configured")]
    NoOperators,
    /// A request number in the path that is not one (400).
    #[error("{0:?} is not a request number")]
    NotARequestNumber(String),
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let code = match self {
            ConsoleError::Body(_) | ConsoleError::NotARequestNumber(_) => StatusCode::BAD_REQUEST,
            ConsoleError::NoOperators => StatusCode::NOT_FOUND,
        };
        error(code, self.to_string())
    }
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ConsoleError> {
    Ok(serde_json::from_slice(body)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    agent: String,
    password: String,
}

pub(crate) fn set_cookie(console: &Console, value: &str, max_age: Option<u64>) -> HeaderValue {
    let mut c = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    if console.config.secure_cookies {
        c.push_str("; Secure");
    }
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn login(
    State(s): State<ApiState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !is_json(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "log in with Content-Type: application/json",
        );
    }
    let l: Login = match parse(&body) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    if l.agent.len() > 64 || l.password.len() > 256 {
        return error(StatusCode::BAD_REQUEST, "agent or password too long");
    }
    let now = Instant::now();
    let ip = remote.ip();
    let known = s.console.operators.contains_key(&l.agent);
    if let Err(wait) = s.console.lock_limiter().begin(now, &l.agent, known, ip) {
        warn!(agent = ?l.agent, %ip, "console log-in refused: too many failed attempts");
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed log-ins; try again later",
        );
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    if !s.console.check_password(&l.agent, &l.password) {
        warn!(agent = ?l.agent, %ip, "console log-in failed");
        return error(StatusCode::UNAUTHORIZED, "wrong agent id or password");
    }
    s.console.lock_limiter().succeeded(now, &l.agent, ip);
    let new = s.console.lock_sessions().create(now, &l.agent);
    info!(agent = %l.agent, %ip, "operator logged in to the console");
    let name = s
        .console
        .operators
        .get(&l.agent)
        .and_then(|o| o.name.clone());
    let role = s.console.role(&l.agent).unwrap_or_default();
    let mut r = Json(json!({
        "agent": l.agent,
        "name": name,
        "role": role,
        "csrf_token": new.csrf,
    }))
    .into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&s.console, &new.token, None));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn logout(State(s): State<ApiState>, Extension(agent): Extension<Agent>) -> Response {
    if let Some(q) = &s.queues {
        match q.agent_request(&agent.id, AgentRequest::SignOff).await {
            Ok(()) | Err(RequestRefusal::UnknownAgent) => {}
            Err(why) => {
                warn!(agent = %agent.id, %why, "operator logged out of the console; still in the queues")
            }
        }
    }
    s.console.lock_sessions().remove(&agent.token);
    info!(agent = %agent.id, "operator logged out of the console");
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&s.console, "", Some(0)));
    r
}

fn queues(s: &ApiState) -> Result<&QueueHandle, ConsoleError> {
    s.queues.as_ref().ok_or(ConsoleError::NoOperators)
}

/// An offer (or the call it became) as the page shows it.
#[derive(Debug, Clone, Serialize)]
struct OfferPayload {
    caller: u64,
    queue: String,
    waited_seconds: u64,
    callback: bool,
    number: Option<String>,
    language: Option<String>,
    call_id: Option<String>,
    /// As the engine records it.
    menu_path: Option<String>,
    /// In words, e.g. "Streets and infrastructure > Pothole".
    menu_words: Option<String>,
    /// The service the caller was filing, to prefill the ticket form.
    service_code: Option<String>,
    /// The ZIP code the caller typed for it.
    zipcode: Option<String>,
    /// The caller's earlier requests (newest first).
    history: Vec<HistoryRow>,
}

#[derive(Debug, Clone, Serialize)]
struct HistoryRow {
    service_request_id: String,
    service_name: String,
    status: &'static str,
    requested_datetime: String,
    address: Option<String>,
    zipcode: Option<String>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

async fn offer_payload(s: &ApiState, o: &OfferView) -> OfferPayload {
    let ctx = o.context.as_deref();
    let words = ctx.map(|c| s.menu.get().file.path_in_words(&c.menu_path));
    let mut history = Vec::new();
    if let Some(number) = ctx.map(|c| c.number.as_str()).filter(|n| !n.is_empty()) {
        let since = OffsetDateTime::now_utc()
            - time::Duration::days(i64::from(s.console.config.history_days));
        match s.tickets.by_phone(number, since, HISTORY_ROWS).await {
            Ok(rows) => {
                history = rows
                    .into_iter()
                    .map(|t| HistoryRow {
                        service_request_id: t.service_request_id.to_string(),
                        service_name: t.service_name,
                        status: t.status.as_str(),
                        requested_datetime: rfc3339(t.requested_datetime),
                        address: t.address,
                        zipcode: t.zipcode,
                    })
                    .collect()
            }
            Err(e) => warn!(error = %e, "a caller's earlier requests could not be read"),
        }
    }
    OfferPayload {
        caller: o.caller,
        queue: o.queue.clone(),
        waited_seconds: o.waited_seconds,
        callback: o.callback,
        number: ctx.map(|c| c.number.clone()),
        language: ctx.map(|c| c.language.clone()),
        call_id: ctx.map(|c| c.call_id.clone()),
        menu_path: ctx.map(|c| c.menu_path.clone()),
        menu_words: words.as_ref().map(|w| w.words.clone()),
        service_code: ctx
            .and_then(|c| c.service_code.clone())
            .or_else(|| words.and_then(|w| w.service_code)),
        zipcode: ctx.and_then(|c| c.zipcode.clone()),
        history,
    }
}

/// The agent's state and offer, with the offer's context and history; and the caller the
/// agent is on a call with, if any.
async fn snapshot(s: &ApiState, agent: &str) -> (serde_json::Value, Option<u64>) {
    let view: Option<AgentConsoleView> = match &s.queues {
        Some(q) => q.console(agent).await,
        None => None,
    };
    let (state, offer) = match view {
        Some(v) => {
            let offer = match (&v.offer, v.agent.state) {
                (Some(o), "ringing" | "on_call") => Some(offer_payload(s, o).await),
                _ => None,
            };
            (Some(v.agent), offer)
        }
        None => (None, None),
    };
    let on_call = state
        .as_ref()
        .filter(|v| v.state == "on_call")
        .and_then(|v| v.caller);
    (json!({ "state": state, "offer": offer }), on_call)
}

async fn session_info(State(s): State<ApiState>, Extension(agent): Extension<Agent>) -> Response {
    let csrf = s
        .console
        .lock_sessions()
        .touch(Instant::now(), &agent.token)
        .map(|x| x.csrf);
    let (snap, _) = snapshot(&s, &agent.id).await;
    let name = s
        .console
        .operators
        .get(&agent.id)
        .and_then(|o| o.name.clone());
    let mut r = Json(json!({
        "agent": agent.id,
        "name": name,
        "role": s.console.role(&agent.id).unwrap_or_default(),
        "csrf_token": csrf,
        "state": snap["state"],
        "offer": snap["offer"],
        "not_ready_reasons": s.console.config.not_ready_reasons,
        "wrap_up_extend_seconds": s.console.config.wrap_up_extend_seconds,
        "services": service_list(&s),
        // For the browser's SIP client (SIP over WebSocket on this server's HTTP port).
        "sip": { "user": agent.id, "websocket_path": "/sip" },
    }))
    .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The `events` stream's state.
struct Stream {
    s: ApiState,
    agent: Agent,
    rx: broadcast::Receiver<AgentNotice>,
    pending: VecDeque<Event>,
    /// The caller the agent was last said to be on a call with, to spot the call ending.
    on_call: Option<u64>,
    check: tokio::time::Interval,
    started: bool,
    done: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.s
            .console
            .lock_sessions()
            .stream_closed(Instant::now(), &self.agent.token);
    }
}

pub(crate) fn event(name: &str, data: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().event(name).data("null"))
}

impl Stream {
    async fn snapshot(&mut self) {
        let (snap, on_call) = snapshot(&self.s, &self.agent.id).await;
        self.on_call = on_call;
        self.pending.push_back(event("snapshot", &snap));
    }

    async fn notice(&mut self, n: AgentNotice) {
        if n.agent() != self.agent.id {
            return;
        }
        match n {
            AgentNotice::Offer(o) => {
                let p = offer_payload(&self.s, &o).await;
                self.pending.push_back(event("offer", &p));
            }
            AgentNotice::State(v) => {
                let now_on = (v.state == "on_call").then_some(v.caller).flatten();
                if let Some(caller) = self.on_call.filter(|c| Some(*c) != now_on) {
                    self.pending
                        .push_back(event("call_ended", &json!({ "caller": caller })));
                }
                self.on_call = now_on;
                self.pending.push_back(event("state", &v));
            }
        }
    }
}

/// `GET /console/events`: a `snapshot` first (and again if the stream fell behind), then
/// `state`, `offer` and `call_ended` as they happen; a comment every 15 s keeps it open.
async fn events(State(s): State<ApiState>, Extension(agent): Extension<Agent>) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    if !s
        .console
        .lock_sessions()
        .stream_opened(Instant::now(), &agent.token)
    {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many event streams open for this session",
        );
    }
    let cancel = s.console.cancel.clone();
    let mut check = tokio::time::interval(STREAM_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let st = Stream {
        rx: q.notices(),
        s,
        agent,
        pending: VecDeque::new(),
        on_call: None,
        check,
        started: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, move |mut st| {
        let cancel = cancel.clone();
        async move {
            if !st.started {
                st.started = true;
                st.snapshot().await;
            }
            loop {
                if let Some(ev) = st.pending.pop_front() {
                    return Some((Ok::<Event, Infallible>(ev), st));
                }
                if st.done {
                    return None;
                }
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    r = st.rx.recv() => match r {
                        Ok(n) => st.notice(n).await,
                        Err(broadcast::error::RecvError::Lagged(_)) => st.snapshot().await,
                        Err(broadcast::error::RecvError::Closed) => st.done = true,
                    },
                    _ = st.check.tick() => {
                        let alive = st
                            .s
                            .console
                            .lock_sessions()
                            .touch(Instant::now(), &st.agent.token)
                            .is_some();
                        if !alive {
                            st.done = true;
                        }
                    }
                }
            }
        }
    });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A state change asked for by an operator (`/console/api/state`) or a supervisor for one
/// (`/supervisor/api/agents/{id}/state`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetState {
    state: String,
    #[serde(default)]
    reason: Option<String>,
}

impl SetState {
    /// The queue's request, or why it is refused (a 400): a not-ready reason must be one of
    /// `reasons` (`console.not_ready_reasons`).
    pub(crate) fn request(self, reasons: &[String]) -> Result<AgentRequest, String> {
        match (self.state.as_str(), self.reason) {
            ("ready", None) => Ok(AgentRequest::Ready),
            ("not_ready", Some(reason)) if reasons.contains(&reason) => {
                Ok(AgentRequest::NotReady { reason })
            }
            ("not_ready", Some(reason)) => Err(format!(
                "reason {reason:?} is not one of console.not_ready_reasons: {}",
                reasons.join(", ")
            )),
            ("not_ready", None) => Err("not_ready needs a reason".into()),
            ("logged_out", None) => Ok(AgentRequest::SignOff),
            (st, _) => Err(format!(
                "state {st:?} must be ready, not_ready (with a reason) or logged_out"
            )),
        }
    }
}

pub(crate) fn refusal(why: RequestRefusal) -> Response {
    let code = match why {
        RequestRefusal::UnknownAgent => StatusCode::NOT_FOUND,
        RequestRefusal::NotRegistered | RequestRefusal::NotInWrapUp => StatusCode::CONFLICT,
    };
    error(code, why.to_string())
}

async fn after_request(
    s: &ApiState,
    agent: &Agent,
    q: &QueueHandle,
    req: AgentRequest,
) -> Response {
    let what = format!("{req:?}");
    match q.agent_request(&agent.id, req).await {
        Ok(()) => {
            info!(agent = %agent.id, request = %what, "operator state request");
            Json(snapshot(s, &agent.id).await.0["state"].clone()).into_response()
        }
        Err(why) => refusal(why),
    }
}

async fn set_state(
    State(s): State<ApiState>,
    Extension(agent): Extension<Agent>,
    body: axum::body::Bytes,
) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    let b: SetState = match parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let req = match b.request(&s.console.config.not_ready_reasons) {
        Ok(req) => req,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    after_request(&s, &agent, &q, req).await
}

async fn wrap_up_end(State(s): State<ApiState>, Extension(agent): Extension<Agent>) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    after_request(&s, &agent, &q, AgentRequest::EndWrapUp).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Extend {
    #[serde(default)]
    seconds: Option<u64>,
}

async fn wrap_up_extend(
    State(s): State<ApiState>,
    Extension(agent): Extension<Agent>,
    body: axum::body::Bytes,
) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    let b: Extend = if body.is_empty() {
        Extend::default()
    } else {
        match parse(&body) {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        }
    };
    let secs = b.seconds.unwrap_or(s.console.config.wrap_up_extend_seconds);
    after_request(
        &s,
        &agent,
        &q,
        AgentRequest::ExtendWrapUp(Duration::from_secs(secs)),
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Decline {
    caller: u64,
}

async fn decline(
    State(s): State<ApiState>,
    Extension(agent): Extension<Agent>,
    body: axum::body::Bytes,
) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    let b: Decline = match parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if q.decline(b.caller, &agent.id).await {
        info!(agent = %agent.id, caller = b.caller, "operator declined an offer");
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::CONFLICT,
            "no offer for this caller is ringing for you",
        )
    }
}

/// The caller the agent is connected to now.
async fn current_call(q: &QueueHandle, agent: &str) -> Option<OfferView> {
    let v = q.console(agent).await?;
    match v.agent.state {
        "on_call" => v.offer.filter(|o| Some(o.caller) == v.agent.caller),
        _ => None,
    }
}

async fn hangup(State(s): State<ApiState>, Extension(agent): Extension<Agent>) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    let Some(call) = current_call(&q, &agent.id).await else {
        return error(StatusCode::CONFLICT, "you are not on a call");
    };
    if s.registry.hangup_id(call.caller) {
        info!(agent = %agent.id, caller = call.caller, "operator hung up from the console");
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::CONFLICT,
            "no live call for this caller here (it ended, or it is a call-back: hang up on the phone)",
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
    Extension(agent): Extension<Agent>,
    body: axum::body::Bytes,
) -> Response {
    let q = match queues(&s) {
        Ok(q) => q.clone(),
        Err(e) => return e.into_response(),
    };
    let b: Transfer = match parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let Some(call) = current_call(&q, &agent.id).await else {
        return error(StatusCode::CONFLICT, "you are not on a call");
    };
    // The same transfer the phone's REFER and the admin API start (911 with its routes and
    // audit, a `transfers` line, another agent, a queue), on the call this operator is on.
    let Some(call_id) = s.registry.call_id(call.caller) else {
        return error(
            StatusCode::CONFLICT,
            "this call cannot be transferred from here (a call-back); use the phone's transfer",
        );
    };
    match s
        .registry
        .transfer_via(&call_id, &b.to, crate::call::TransferVia::Console)
        .await
    {
        Ok(id) => {
            warn!(agent = %agent.id, to = %b.to, transfer = id, "operator transfers the caller");
            (
                StatusCode::ACCEPTED,
                Json(json!({ "transfer_id": id, "progress": format!("/console/api/transfers/{id}") })),
            )
                .into_response()
        }
        Err((code, why)) => error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT),
            &why,
        ),
    }
}

/// A transfer this operator asked for: its progress (404 for anyone else's).
async fn transfer_progress(
    State(s): State<ApiState>,
    Extension(agent): Extension<Agent>,
    Path(id): Path<u64>,
) -> Response {
    match s.registry.transfer_info(id) {
        Some(t) if t.operator.as_deref() == Some(agent.id.as_str()) => Json(t).into_response(),
        _ => error(StatusCode::NOT_FOUND, "no such transfer of yours"),
    }
}

fn service_list(s: &ApiState) -> Vec<serde_json::Value> {
    let menu = s.menu.get();
    crate::api::open311::services(&menu.file)
        .into_iter()
        .map(|x| {
            json!({
                "service_code": x.action.service,
                "service_name": x.action.name,
                "group": x.group,
                "agency": x.action.agency,
                "description": x.action.description,
            })
        })
        .collect()
}

async fn services(State(s): State<ApiState>) -> Response {
    Json(service_list(&s)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRequest {
    service_code: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    zipcode: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

/// `text` trimmed, `None` if empty; an error if longer than `max` characters or holding
/// control characters (line breaks and tabs allowed when `multiline`).
fn text_field(
    name: &str,
    text: Option<String>,
    max: usize,
    multiline: bool,
) -> Result<Option<String>, String> {
    let Some(t) = text.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if t.chars().count() > max {
        return Err(format!("{name} longer than {max} characters"));
    }
    if t.chars()
        .any(|c| c.is_control() && !(multiline && matches!(c, '\n' | '\r' | '\t')))
    {
        return Err(format!("{name} holds control characters"));
    }
    Ok(Some(t))
}

/// A ticket as the console shows it (the caller's details included: operators are staff).
fn ticket_json(t: &Ticket) -> serde_json::Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "service_request_id".into(),
            json!(t.service_request_id.to_string()),
        );
        o.remove("recording");
    }
    v
}

fn store_failed(e: &crate::dispatch::tickets::StoreError) -> Response {
    warn!(error = %e, "console ticket operation failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the ticket store is unavailable; try again",
    )
}

async fn file_request(
    State(s): State<ApiState>,
    Extension(agent): Extension<Agent>,
    body: axum::body::Bytes,
) -> Response {
    let b: FileRequest = match parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let menu = s.menu.get();
    let Some(service) = crate::api::open311::find_service(&menu.file, &b.service_code) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "service_code {:?} is not a service of the menu",
                b.service_code
            ),
        );
    };
    let fields = (|| {
        Ok::<_, String>((
            text_field("address", b.address, MAX_ADDRESS, false)?,
            text_field("zipcode", b.zipcode, 10, false)?,
            text_field("description", b.description, MAX_TEXT, true)?,
        ))
    })();
    let (address, zipcode, description) = match fields {
        Ok(f) => f,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    if zipcode
        .as_deref()
        .is_some_and(|z| !z.chars().all(|c| c.is_ascii_digit() || c == '-'))
    {
        return error(StatusCode::BAD_REQUEST, "zipcode must be digits");
    }
    // The caller's details come from the agent's own current call, never from the request.
    let call = match &s.queues {
        Some(q) => current_call(q, &agent.id).await,
        None => None,
    };
    let ctx = call.as_ref().and_then(|c| c.context.clone());
    let t = NewTicket {
        service_code: service.action.service.clone(),
        service_name: service.action.name.clone(),
        agency_responsible: service.action.agency.clone(),
        description,
        address,
        zipcode,
        phone: ctx
            .as_ref()
            .map(|c| c.number.clone())
            .filter(|n| !n.is_empty()),
        language: ctx.as_ref().map(|c| c.language.clone()),
        call_id: ctx.as_ref().map(|c| c.call_id.clone()),
        callback_requested: call.as_ref().is_some_and(|c| c.callback),
        channel: Channel::Operator,
        agent_id: Some(agent.id.clone()),
        ..NewTicket::default()
    };
    match s.tickets.file(t).await {
        Ok(t) => {
            info!(agent = %agent.id, service_request_id = t.service_request_id, "operator filed a ticket");
            (StatusCode::CREATED, Json(ticket_json(&t))).into_response()
        }
        Err(e) => store_failed(&e),
    }
}

fn request_id(id: &str) -> Result<u64, ConsoleError> {
    id.parse::<u64>()
        .map_err(|_| ConsoleError::NotARequestNumber(id.to_owned()))
}

async fn get_request(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let id = match request_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match s.tickets.get(id).await {
        Ok(Some(t)) => Json(ticket_json(&t)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such request"),
        Err(e) => store_failed(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    status: String,
    #[serde(default)]
    status_notes: Option<String>,
}

async fn update_request(
    State(s): State<ApiState>,
    Extension(agent): Extension<Agent>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let id = match request_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let b: UpdateRequest = match parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let Ok(status) = b.status.parse::<Status>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("status {:?} must be open or closed", b.status),
        );
    };
    let notes = match text_field("status_notes", b.status_notes, MAX_TEXT, true) {
        Ok(n) => n,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    match s.tickets.update_status(id, status, notes.as_deref()).await {
        Ok(Some(t)) => {
            info!(agent = %agent.id, service_request_id = id, status = status.as_str(), "operator updated a ticket");
            Json(ticket_json(&t)).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no such request"),
        Err(e) => store_failed(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(secret: AgentSecret) -> Console {
        let agent = crate::config::AgentConfig {
            id: "1001".into(),
            password: secret,
            skills: vec![],
            tier: 1,
            name: None,
            role: Default::default(),
        };
        Console::new(ConsoleConfig::default(), &[agent], CancellationToken::new())
    }

    #[test]
    fn passwords_are_checked_as_the_registrar_stores_them() {
        let plain = console("s3cret".into());
        assert!(plain.check_password("1001", "s3cret"));
        assert!(!plain.check_password("1001", "s3cret "));
        assert!(!plain.check_password("1002", "s3cret"));
        let ha1 = console(AgentSecret::Ha1(PasswordHa1::of("1001", REALM, "s3cret")));
        assert!(ha1.check_password("1001", "s3cret"));
        assert!(!ha1.check_password("1001", "wrong"));
        let md5_only = console(AgentSecret::Ha1(PasswordHa1 {
            sha256: None,
            ..PasswordHa1::of("1001", REALM, "s3cret")
        }));
        assert!(md5_only.check_password("1001", "s3cret"));
        assert!(!md5_only.check_password("1001", "other"));
        assert!(!console("".into()).check_password("1001", ""));
    }

    #[test]
    fn the_session_cookie_is_read_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; ivr311_console=abc123; c=d"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("abc123"));
        let mut none = HeaderMap::new();
        none.insert(header::COOKIE, HeaderValue::from_static("ivr311_console="));
        assert_eq!(cookie(&none), None);
    }

    #[test]
    fn text_fields_are_bounded_and_free_of_control_characters() {
        assert_eq!(text_field("a", Some("  ".into()), 5, false), Ok(None));
        assert_eq!(
            text_field("a", Some(" x ".into()), 5, false),
            Ok(Some("x".into()))
        );
        assert!(text_field("a", Some("123456".into()), 5, false).is_err());
        assert!(text_field("a", Some("a\nb".into()), 5, false).is_err());
        assert!(text_field("a", Some("a\nb".into()), 5, true).is_ok());
        assert!(text_field("a", Some("a\u{7}".into()), 5, true).is_err());
    }
}
