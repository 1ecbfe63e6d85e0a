//! The admin API under `/admin/` and `/metrics`.
//!
//! Authorisation: with `admin.token` configured, every request needs
//! `Authorization: Bearer <token>`; with none, only loopback clients are served (403 otherwise),
//! so a fresh install never exposes call control to the network.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/admin/calls` | live calls: caller, language, current menu or state, seconds in call |
//! | POST | `/admin/calls/{call_id}/hangup` | hang a call up (BYE) |
//! | POST | `/admin/menu/reload` | validate the menu file and prompts again; swap for new calls only |
//! | POST | `/admin/requests/{id}` | staff status update: JSON `{"status": "open"/"closed", "status_notes": "..."}` |
//! | GET | `/admin/emergency` | the latest 911 redirect audit rows |
//! | GET | `/admin/queues` | per queue: waiting, longest wait, agents by status, answered, abandoned, service level |
//! | GET | `/admin/agents` | each operator: status, calls taken, idle since, `login_lock` (log-ins refused after failed guesses: seconds left for new addresses and for its usual ones, or null) |
//! | POST | `/admin/agents/{id}/pause` | pause an operator, JSON `{"reason": "..."}`; `/unpause` to resume |
//! | GET | `/metrics` | Prometheus text format |

use crate::api::ApiState;
use crate::dispatch::tickets::Status;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use tracing::{info, warn};

/// Routes (nested at the root: they carry their own `/admin` and `/metrics` prefixes).
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/admin/calls", get(calls))
        .route("/admin/calls/{call_id}/hangup", post(hangup))
        .route("/admin/menu/reload", post(reload))
        .route("/admin/requests/{id}", post(update_request))
        .route("/admin/emergency", get(emergency))
        .route("/admin/queues", get(queues))
        .route("/admin/agents", get(agents))
        .route("/admin/agents/{id}/pause", post(pause))
        .route("/admin/agents/{id}/unpause", post(unpause))
        .route("/metrics", get(metrics))
}

/// Whether this request may use the admin API.
fn authorized(s: &ApiState, headers: &HeaderMap, remote: SocketAddr) -> bool {
    match &s.admin.token {
        Some(token) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes())),
        None => remote.ip().is_loopback(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        Json(json!({"error": "admin API: a valid bearer token is required (or loopback when none is configured)"})),
    )
        .into_response()
}

macro_rules! guard {
    ($s:expr, $h:expr, $r:expr) => {
        if !authorized(&$s, &$h, $r) {
            warn!(remote = %$r, "admin request refused");
            return forbidden();
        }
    };
}

/// One live call.
#[derive(Debug, Serialize, Deserialize)]
pub struct LiveCall {
    pub call_id: String,
    pub caller: String,
    pub language: String,
    pub state: String,
    pub seconds: u64,
    pub rtp_port: u16,
}

async fn calls(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Response {
    guard!(s, h, r);
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

async fn hangup(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    Path(call_id): Path<String>,
) -> Response {
    guard!(s, h, r);
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

async fn reload(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Response {
    guard!(s, h, r);
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
pub struct StatusUpdate {
    pub status: String,
    #[serde(default)]
    pub status_notes: Option<String>,
}

async fn update_request(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    guard!(s, h, r);
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

async fn emergency(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Response {
    guard!(s, h, r);
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

async fn metrics(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Response {
    guard!(s, h, r);
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

async fn queues(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Response {
    guard!(s, h, r);
    match &s.queues {
        Some(q) => Json(q.figures().await).into_response(),
        None => Json(Vec::<()>::new()).into_response(),
    }
}

async fn agents(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Response {
    guard!(s, h, r);
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
pub struct Pause {
    #[serde(default)]
    pub reason: Option<String>,
}

async fn pause(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    guard!(s, h, r);
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

async fn unpause(
    State(s): State<ApiState>,
    ConnectInfo(r): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    guard!(s, h, r);
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
