//! The admin API under `/admin/` and `/metrics`.
//!
//! Authorisation, checked for every route before its handler runs (`guard`):
//!
//! * With `admin.token` configured, every request needs `Authorization: Bearer <token>`. The
//!   token is compared as a SHA-256 digest in constant time, so neither its bytes nor its
//!   length leak through timing.
//! * With none, only a client on this machine is served, and only when it talks to us
//!   directly: the peer address must be loopback, the request must carry no proxy header
//!   (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`: a reverse proxy on this host would
//!   otherwise make the API public), and its `Host` (and an absolute request URI's authority)
//!   must be a loopback name or address (`localhost`, `127.0.0.1`, `[::1]`, with any port), so
//!   a web page that rebinds its own name to 127.0.0.1 (DNS rebinding) is refused.
//! * Everywhere, a request that changes state (every method but GET and HEAD) needs
//!   `Content-Type: application/json`, even with an empty body (415 otherwise): a web page can
//!   make a browser send a cross-site `text/plain` or form POST without asking, never a JSON
//!   one.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/admin/calls` | live calls: caller, language, current menu or state, seconds in call |
//! | POST | `/admin/calls/{call_id}/hangup` | hang a call up (BYE) |
//! | POST | `/admin/calls/{call_id}/transfer` | transfer the caller away from their operator, JSON `{"to": "911" \| "<transfers name or number>" \| "agent:<id>" \| "queue:<name>"}`: 202 with `{"transfer_id": n}`; 404 no such call or target, 403 a number the plan forbids, 409 not with an operator or a transfer in progress |
//! | POST | `/admin/calls/{call_id}/monitor` | a supervisor listens, whispers or barges, JSON `{"mode": "listen" \| "whisper" \| "barge", "supervisor": "<agent id>"}`: the server calls the supervisor's registered phone and joins it when answered; 202, or 404 no such call, 403 not a supervisor, 409 not with an operator or the supervisor's phone not registered ([`crate::call::monitor`]) |
//! | GET | `/admin/calls/{call_id}/recording` | the recording of a caller's talk with an operator of a queue with `record: true` (`audio/wav`, stereo: caller left, operator right), once the talk ended; 404 if none ([`crate::media::call_record`]) |
//! | GET | `/admin/transfers/{id}` | a transfer's progress: `state` (`calling`, `ringing`, `calling 911`, then `connected` or `failed: ...` and where the caller went), `caller_state`, `done` |
//! | POST | `/admin/menu/reload` | validate the menu file and prompts again; swap for new calls only |
//! | GET | `/admin/requests/{id}` | one ticket with every field (personal ones too), and `external_id`, the CRM's number for it once forwarded |
//! | POST | `/admin/requests/{id}` | staff status update: JSON `{"status": "open"/"closed", "status_notes": "..."}` |
//! | GET | `/admin/outbox` | the outbox, newest first: `?state=pending\|in_flight\|done\|dead`, `?limit=` (default 100, at most 1000); each row's kind (`open311`, `webhook`), target, ticket, event, state, attempts, times and `last_error` |
//! | POST | `/admin/outbox/{id}/retry` | send a dead-lettered row again (after fixing the mapping): 200, or 404 if no dead row has that id |
//! | GET | `/admin/requests/{id}/recording` | the caller's recorded description of a phone ticket (`audio/wav`) |
//! | GET | `/admin/emergency` | the latest 911 redirect audit rows |
//! | GET | `/admin/queues` | per queue: waiting, longest wait, agents by status, answered, abandoned, service level |
//! | GET | `/admin/agents` | each operator: status, calls taken, idle since, `login_lock` (log-ins refused after failed guesses: seconds left for new addresses and for its usual ones, or null) |
//! | POST | `/admin/agents/{id}/pause` | pause an operator, JSON `{"reason": "..."}`; `/unpause` to resume |
//! | GET | `/admin/reports/calls` | calls by interval from the call history: offered, answered, abandoned, service level... ([`super::reports`]) |
//! | GET | `/admin/reports/agents` | operators by interval: calls, talk, wrap-up, ready and not-ready time, occupancy |
//! | POST, GET | `/admin/announcements` | set an emergency announcement, list those active or scheduled ([`super::announcements`]) |
//! | DELETE | `/admin/announcements/{id}` | end one now |
//! | GET | `/metrics` | Prometheus text format |

use crate::api::ApiState;
use crate::dispatch::tickets::Status;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use tracing::{info, warn};

/// Routes (nested at the root: they carry their own `/admin` and `/metrics` prefixes), each
/// behind `guard`.
pub(crate) fn router(state: ApiState) -> Router<ApiState> {
    Router::new()
        .route("/admin/calls", get(calls))
        .route("/admin/calls/{call_id}/hangup", post(hangup))
        .route("/admin/calls/{call_id}/transfer", post(transfer))
        .route("/admin/calls/{call_id}/monitor", post(monitor))
        .route("/admin/calls/{call_id}/recording", get(call_recording))
        .route("/admin/transfers/{id}", get(transfer_progress))
        .route("/admin/menu/reload", post(reload))
        .route(
            "/admin/requests/{id}",
            post(update_request).get(get_request),
        )
        .route("/admin/outbox", get(outbox))
        .route("/admin/outbox/{id}/retry", post(outbox_retry))
        .route("/admin/requests/{id}/recording", get(recording))
        .route("/admin/emergency", get(emergency))
        .route("/admin/queues", get(queues))
        .route("/admin/agents", get(agents))
        .route("/admin/agents/{id}/pause", post(pause))
        .route("/admin/agents/{id}/unpause", post(unpause))
        .route("/admin/reports/calls", get(super::reports::calls))
        .route("/admin/reports/agents", get(super::reports::agents))
        .route(
            "/admin/announcements",
            post(super::announcements::post)
                .get(super::announcements::list)
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::dispatch::announcements::MAX_WAV_BYTES * 3,
                )),
        )
        .route(
            "/admin/announcements/{id}",
            axum::routing::delete(super::announcements::delete),
        )
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state, guard))
}

/// Proxy headers: a request carrying one came through a proxy, whatever its peer address.
const PROXY_HEADERS: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

/// Why a request may not use the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `admin.token` is set and the request has no bearer token, or another one.
    Token,
    /// No token is configured and the peer is not on this machine.
    NotLoopback,
    /// No token is configured and the request came through a proxy (the header named).
    Proxied(&'static str),
    /// No token is configured and the request names a host that is not loopback.
    Host,
}

impl Refusal {
    fn message(&self) -> String {
        match self {
            Refusal::Token => "admin API: a valid bearer token is required".into(),
            Refusal::NotLoopback => {
                "admin API: without admin.token only clients on this machine are served".into()
            }
            Refusal::Proxied(h) => format!(
                "admin API: without admin.token requests through a proxy ({h}) are refused; \
                 configure admin.token"
            ),
            Refusal::Host => "admin API: without admin.token the Host must be localhost, \
                 127.0.0.1 or [::1]"
                .into(),
        }
    }
}

/// Whether this request may use the admin API.
pub(crate) fn authorize(
    token: Option<&str>,
    headers: &HeaderMap,
    uri: &Uri,
    remote: SocketAddr,
) -> Result<(), Refusal> {
    if let Some(token) = token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(rest)
            });
        return match given {
            Some(given) if crate::api::same_secret(given.trim(), token) => Ok(()),
            _ => Err(Refusal::Token),
        };
    }
    if !remote.ip().to_canonical().is_loopback() {
        return Err(Refusal::NotLoopback);
    }
    if let Some(h) = PROXY_HEADERS.into_iter().find(|h| headers.contains_key(*h)) {
        return Err(Refusal::Proxied(h));
    }
    let hosts = headers
        .get_all(header::HOST)
        .iter()
        .map(|v| v.to_str().ok())
        .chain(uri.authority().map(|a| Some(a.as_str())));
    for host in hosts {
        if !host.is_some_and(loopback_host) {
            return Err(Refusal::Host);
        }
    }
    Ok(())
}

/// `localhost`, a loopback address, either with a port.
fn loopback_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || valid_port(port) => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if valid_port(&format!(":{port}")) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `:port` with a port number.
fn valid_port(s: &str) -> bool {
    s.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether the body is declared JSON (`application/json`, parameters allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Runs before every admin route: authorisation, then the JSON rule for state changes.
async fn guard(
    State(s): State<ApiState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if let Err(why) = authorize(s.admin.token.as_deref(), req.headers(), req.uri(), remote) {
        warn!(%remote, path = req.uri().path(), refusal = ?why, "admin request refused");
        return (StatusCode::FORBIDDEN, Json(json!({"error": why.message()}))).into_response();
    }
    let reads = req.method() == Method::GET || req.method() == Method::HEAD;
    if !reads && !is_json(req.headers()) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(json!({
                "error": "admin API: requests that change state need Content-Type: application/json"
            })),
        )
            .into_response();
    }
    next.run(req).await
}

/// One live call.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LiveCall {
    pub(crate) call_id: String,
    pub(crate) caller: String,
    pub(crate) language: String,
    pub(crate) state: String,
    pub(crate) seconds: u64,
    pub(crate) rtp_port: u16,
}

async fn calls(State(s): State<ApiState>) -> Response {
    let mut v: Vec<LiveCall> = s
        .registry
        .snapshot()
        .into_iter()
        .map(|c| LiveCall {
            seconds: c.started.elapsed().as_secs(),
            call_id: c.call_id,
            caller: c.caller,
            language: c.language,
            state: c.state,
            rtp_port: c.rtp_port,
        })
        .collect();
    v.sort_by_key(|c| std::cmp::Reverse(c.seconds));
    Json(v).into_response()
}

async fn hangup(State(s): State<ApiState>, Path(call_id): Path<String>) -> Response {
    if s.registry.hangup(&call_id) {
        info!(%call_id, "admin hung up a call");
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such call"})),
        )
            .into_response()
    }
}

/// `POST /admin/calls/{call_id}/transfer` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    to: String,
}

async fn transfer(
    State(s): State<ApiState>,
    Path(call_id): Path<String>,
    body: Result<Json<TransferBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "expected JSON {\"to\": \"911\" | \"<transfers name or number>\" | \"agent:<id>\" | \"queue:<name>\"}"})),
        )
            .into_response();
    };
    match s.registry.transfer(&call_id, &body.to).await {
        Ok(id) => {
            info!(%call_id, to = %body.to, transfer = id, "admin asked for a transfer");
            (StatusCode::ACCEPTED, Json(json!({"transfer_id": id}))).into_response()
        }
        Err((code, why)) => {
            if code == 404 && why == "no such call" {
                // Counted where the call refuses; a call that does not exist is counted here.
                s.metrics.add(
                    "ivr311_transfer_refusals_total",
                    "Transfer requests (REFER, an agent's call, the admin API) refused, by reason.",
                    &[("reason", "no_such_call")],
                    1,
                );
            }
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT);
            (status, Json(json!({"error": why}))).into_response()
        }
    }
}

async fn monitor(
    State(s): State<ApiState>,
    Path(call_id): Path<String>,
    body: Result<Json<crate::call::monitor::MonitorBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "expected JSON {\"mode\": \"listen\" | \"whisper\" | \"barge\", \"supervisor\": \"<agent id>\"}"})),
        )
            .into_response();
    };
    match s.monitors.start(&call_id, &body).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({"state": "calling the supervisor"})),
        )
            .into_response(),
        Err((code, why)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT);
            (status, Json(json!({"error": why}))).into_response()
        }
    }
}

async fn transfer_progress(State(s): State<ApiState>, Path(id): Path<u64>) -> Response {
    match s.registry.transfer_info(id) {
        Some(t) => Json(t).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such transfer (finished ones are kept for a while)"})),
        )
            .into_response(),
    }
}

async fn reload(State(s): State<ApiState>) -> Response {
    match s.menu.reload().await {
        Ok(m) => Json(json!({
            "status": "ok",
            "path": m.path.display().to_string(),
            "menus": m.file.menus.len(),
            "languages": m.file.languages,
        }))
        .into_response(),
        Err(e) => {
            warn!(error = %e, "menu reload refused; the menu in service stays");
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"status": "refused", "errors": e.lines()})),
            )
                .into_response()
        }
    }
}

/// Body of a staff status update.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatusUpdate {
    pub(crate) status: String,
    #[serde(default)]
    pub(crate) status_notes: Option<String>,
}

async fn get_request(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("{id:?} is not a request number")})),
        )
            .into_response();
    };
    match s.tickets.get(id).await {
        Ok(Some(t)) => Json(t).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such request"})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboxQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

async fn outbox(
    State(s): State<ApiState>,
    query: Result<axum::extract::Query<OutboxQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let bad = |msg: String| (StatusCode::BAD_REQUEST, Json(json!({"error": msg}))).into_response();
    let q = match query {
        Ok(q) => q.0,
        Err(e) => return bad(e.body_text()),
    };
    if let Some(st) = &q.state {
        if !["pending", "in_flight", "done", "dead"].contains(&st.as_str()) {
            return bad(format!(
                "state {st:?} must be pending, in_flight, done or dead"
            ));
        }
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match s.tickets.outbox_list(q.state.as_deref(), limit).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn outbox_retry(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("{id:?} is not an outbox id")})),
        )
            .into_response();
    };
    let now_ms = crate::dispatch::outbox::epoch_ms(time::OffsetDateTime::now_utc());
    match s.tickets.outbox_revive(id, now_ms).await {
        Ok(true) => {
            info!(
                outbox_id = id,
                "outbox: dead-lettered item sent again by an admin"
            );
            Json(json!({"id": id, "state": "pending"})).into_response()
        }
        Ok(false) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no dead-lettered outbox item with that id"})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn update_request(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let bad = |msg: String| (StatusCode::BAD_REQUEST, Json(json!({"error": msg}))).into_response();
    let Ok(id) = id.parse::<u64>() else {
        return bad(format!("{id:?} is not a request number"));
    };
    let upd: StatusUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => return bad(format!("body: {e}")),
    };
    let Ok(status) = upd.status.parse::<Status>() else {
        return bad(format!("status {:?} must be open or closed", upd.status));
    };
    if upd
        .status_notes
        .as_ref()
        .is_some_and(|n| n.chars().count() > 4000)
    {
        return bad("status_notes longer than 4000 characters".into());
    }
    match s
        .tickets
        .update_status(id, status, upd.status_notes.as_deref())
        .await
    {
        Ok(Some(t)) => {
            info!(id, status = status.as_str(), "request status updated");
            Json(json!({
                "service_request_id": t.service_request_id.to_string(),
                "status": t.status.as_str(),
                "status_notes": t.status_notes,
                "external_id": t.external_id,
            }))
            .into_response()
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such request"})),
        )
            .into_response(),
        Err(e) => {
            warn!(error = %e, "status update failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": e.to_string()})),
            )
                .into_response()
        }
    }
}

/// `GET /admin/calls/{call_id}/recording`: the recording of the caller's talk with an
/// operator, once finished.
async fn call_recording(State(s): State<ApiState>, Path(call_id): Path<String>) -> Response {
    let path = crate::media::call_record::path_for(&s.recordings, &call_id);
    let name = crate::media::call_record::file_name(&call_id);
    match tokio::fs::read(&path).await {
        Ok(wav) => {
            info!(recording = %name, "call recording fetched");
            (
                [
                    (header::CONTENT_TYPE, "audio/wav".to_string()),
                    (header::CACHE_CONTROL, "no-store".to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{name}\""),
                    ),
                ],
                wav,
            )
                .into_response()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "this call has no finished recording"})),
        )
            .into_response(),
        Err(e) => {
            warn!(recording = %name, error = %e, "call recording unreadable");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": "the recording cannot be read"})),
            )
                .into_response()
        }
    }
}

/// `GET /admin/requests/{id}/recording`: the caller's recorded description, as filed.
async fn recording(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let not_found =
        |msg: &str| (StatusCode::NOT_FOUND, Json(json!({"error": msg}))).into_response();
    let Ok(id) = id.parse::<u64>() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("{id:?} is not a request number")})),
        )
            .into_response();
    };
    let ticket = match s.tickets.get(id).await {
        Ok(Some(t)) => t,
        Ok(None) => return not_found("no such request"),
        Err(e) => {
            warn!(error = %e, "recording lookup failed");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    let Some(name) = ticket.recording.as_deref() else {
        return not_found("this request has no recording");
    };
    let Some(path) = crate::media::record::recording_path(&s.recordings, name) else {
        warn!(
            id,
            recording = name,
            "stored recording name is not a plain file name"
        );
        return not_found("this request has no recording");
    };
    match tokio::fs::read(&path).await {
        Ok(wav) => {
            info!(id, "recording fetched");
            (
                [
                    (header::CONTENT_TYPE, "audio/wav".to_string()),
                    (header::CACHE_CONTROL, "no-store".to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{id}.wav\""),
                    ),
                ],
                wav,
            )
                .into_response()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!(id, path = %path.display(), "recording file missing");
            not_found("the recording file is missing")
        }
        Err(e) => {
            warn!(id, path = %path.display(), error = %e, "recording unreadable");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": "the recording cannot be read"})),
            )
                .into_response()
        }
    }
}

async fn emergency(State(s): State<ApiState>) -> Response {
    match s.tickets.emergency_audits(100).await {
        Ok(rows) => Json(
            rows.into_iter()
                .map(|a| {
                    json!({
                        "id": a.id, "at": a.at.to_string(), "caller": a.caller, "call_id": a.call_id,
                        "menu_path": a.menu_path, "reason": a.reason, "method": a.method, "outcome": a.outcome,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e.to_string()}))).into_response(),
    }
}

async fn metrics(State(s): State<ApiState>) -> Response {
    let gauges = [
        (
            "ivr311_live_calls",
            "Calls in progress.",
            s.registry.len() as f64,
        ),
        (
            "ivr311_sip_dialogs",
            "SIP dialogs held by the UA core.",
            s.ua.dialogs.load(Ordering::Relaxed) as f64,
        ),
        (
            "ivr311_sip_transactions",
            "SIP transactions held by the UA core.",
            (s.ua.server_transactions.load(Ordering::Relaxed)
                + s.ua.client_transactions.load(Ordering::Relaxed)) as f64,
        ),
        (
            "ivr311_rtp_ports_free",
            "RTP ports free in --rtp-ports.",
            s.ports.available() as f64,
        ),
        (
            "ivr311_calls_rejected",
            "INVITEs refused (limits, codecs, shutdown) since start.",
            s.registry.rejected.load(Ordering::Relaxed) as f64,
        ),
        (
            "ivr311_sip_messages_malformed",
            "SIP messages that failed to parse since start.",
            s.transport.malformed.load(Ordering::Relaxed) as f64,
        ),
        (
            "ivr311_sip_malformed_unanswered",
            "Malformed SIP requests left unanswered since start: their source was over the error-answer rate limit.",
            s.transport.malformed_unanswered.load(Ordering::Relaxed) as f64,
        ),
        (
            "ivr311_uptime_seconds",
            "Seconds since start.",
            s.started.elapsed().as_secs_f64(),
        ),
    ];
    let mut gauges = gauges.to_vec();
    if let Some(t) = s.ua.trunk_registration() {
        gauges.push((
            "ivr311_trunk_registered",
            "1 while our registration with the trunk (trunks.register) holds, else 0.",
            if t.state == "registered" { 1.0 } else { 0.0 },
        ));
    }
    if s.ready.outbox_stuck_after.is_some() {
        if let Ok(st) = s.tickets.outbox_stats().await {
            let now_ms = crate::dispatch::outbox::epoch_ms(time::OffsetDateTime::now_utc());
            gauges.push((
                "ivr311_outbox_depth",
                "Outbox items (to the CRM and webhooks) not yet delivered.",
                st.depth as f64,
            ));
            gauges.push((
                "ivr311_outbox_oldest_age_seconds",
                "Age of the oldest outbox item not yet delivered (0 when none).",
                st.oldest_ms
                    .map_or(0.0, |o| now_ms.saturating_sub(o).max(0) as f64 / 1000.0),
            ));
            gauges.push((
                "ivr311_outbox_dead",
                "Outbox items dead-lettered (GET /admin/outbox?state=dead).",
                st.dead as f64,
            ));
        }
    }
    let mut text = s.metrics.render(&gauges);
    if let Some(q) = &s.queues {
        use std::fmt::Write as _;
        let figures = q.figures().await;
        type Get = fn(&crate::dispatch::queue::QueueFigures) -> f64;
        let series: [(&str, &str, Get); 6] = [
            (
                "ivr311_queue_waiting",
                "Callers waiting for an operator.",
                |f| f.waiting as f64,
            ),
            (
                "ivr311_queue_longest_wait_seconds",
                "Longest current wait.",
                |f| f.longest_wait.as_secs_f64(),
            ),
            (
                "ivr311_queue_answered",
                "Callers answered by an operator since start.",
                |f| f.answered as f64,
            ),
            (
                "ivr311_queue_abandoned",
                "Callers who left the queue unanswered since start.",
                |f| f.abandoned as f64,
            ),
            (
                "ivr311_queue_answered_within_30s",
                "Callers answered within 30 seconds since start.",
                |f| f.answered_within_30s as f64,
            ),
            (
                "ivr311_queue_service_level",
                "Answered within 30 s / (answered + abandoned).",
                |f| f.service_level.unwrap_or(1.0),
            ),
        ];
        for (name, help, get) in series {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
            for f in &figures {
                let _ = writeln!(
                    text,
                    "{name}{{queue=\"{}\"}} {}",
                    f.name.replace('"', "'"),
                    get(f)
                );
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn no_queues() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "no operators are configured"})),
    )
        .into_response()
}

async fn queues(State(s): State<ApiState>) -> Response {
    match &s.queues {
        Some(q) => Json(q.figures().await).into_response(),
        None => Json(Vec::<()>::new()).into_response(),
    }
}

async fn agents(State(s): State<ApiState>) -> Response {
    let Some(q) = &s.queues else {
        return Json(Vec::<()>::new()).into_response();
    };
    // Each agent, with `login_lock`: null, or how long log-ins stay refused after repeated
    // failed registrations (from new addresses; from its usual ones too).
    let locks = s.ua.login_locks();
    let list: Vec<serde_json::Value> = q
        .agents()
        .await
        .into_iter()
        .map(|a| {
            let lock = locks.iter().find(|l| l.agent == a.id);
            let mut v = serde_json::to_value(&a).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "login_lock".into(),
                    lock.map_or(serde_json::Value::Null, |l| {
                        json!({
                            "new_sources_seconds": l.new_sources_seconds,
                            "usual_sources_seconds": l.usual_sources_seconds,
                        })
                    }),
                );
            }
            v
        })
        .collect();
    Json(list).into_response()
}

/// Body of a pause.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Pause {
    #[serde(default)]
    pub(crate) reason: Option<String>,
}

async fn pause(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(q) = &s.queues else {
        return no_queues();
    };
    let p: Pause = if body.is_empty() {
        Pause::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": format!("body: {e}")})),
                )
                    .into_response()
            }
        }
    };
    let reason = p.reason.unwrap_or_else(|| "paused by admin".into());
    if q.pause(&id, &reason).await {
        info!(agent = %id, %reason, "agent paused");
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such agent, or not logged in"})),
        )
            .into_response()
    }
}

async fn unpause(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let Some(q) = &s.queues else {
        return no_queues();
    };
    if q.unpause(&id).await {
        info!(agent = %id, "agent unpaused");
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such agent, or not paused"})),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "LOCALHOST:8311",
            "localhost.",
            "127.0.0.1",
            "127.0.0.1:8311",
            "127.3.4.5:1",
            "[::1]",
            "[::1]:8311",
            "[::ffff:127.0.0.1]:8311",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:8311",
            "[::2]:8311",
            "::1",
            "localhost:",
            "localhost:99999x",
            "[::1]x",
            "0.0.0.0",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn without_a_token_only_direct_local_clients() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let uri: Uri = "/admin/calls".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8311".parse().unwrap());
        assert_eq!(authorize(None, &h, &uri, local), Ok(()));
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        assert_eq!(authorize(None, &h, &uri, mapped), Ok(()));
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        assert_eq!(authorize(None, &h, &uri, remote), Err(Refusal::NotLoopback));
        let mut proxied = h.clone();
        proxied.insert("x-real-ip", "192.0.2.7".parse().unwrap());
        assert_eq!(
            authorize(None, &proxied, &uri, local),
            Err(Refusal::Proxied("x-real-ip"))
        );
        // Two Host headers: every one must be loopback.
        let mut two = h.clone();
        two.append(header::HOST, "attacker.example".parse().unwrap());
        assert_eq!(authorize(None, &two, &uri, local), Err(Refusal::Host));
        // With a token, the token decides.
        let mut with = proxied.clone();
        with.insert(header::AUTHORIZATION, "Bearer t0k".parse().unwrap());
        assert_eq!(authorize(Some("t0k"), &with, &uri, remote), Ok(()));
        assert_eq!(
            authorize(Some("t0k2"), &with, &uri, remote),
            Err(Refusal::Token)
        );
    }
}
