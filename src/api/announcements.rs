//! `/admin/announcements`: the city's emergency announcements ([`crate::dispatch::announcements`]),
//! behind the admin API's guard (bearer token, JSON bodies).
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | POST | `/admin/announcements` | set one: JSON `{"messages": {"en": {"text": "...", "wav_base64": "..."}}, "starts_at": "RFC 3339", "ends_at": "...", "entries": [{"key": "7", "ticket": {"service": "storm_debris", "name": "...", "description": "...", "group": "..."}}, {"key": "...", "info": {"en": {...}}}]}`: 201 with the stored view, 422 with every problem |
//! | GET | `/admin/announcements` | those active or scheduled, by start (no audio) |
//! | DELETE | `/admin/announcements/{id}` | end one now: 200, 404 if none is running or scheduled |
//!
//! Every change is written to the audit log (target `ivr311::audit`: who, id, times, keys).

use crate::api::ApiState;
use crate::dispatch::announcements::{self, AnnouncementError, AnnouncementSpec};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tracing::{info, warn};

/// Who changes announcements: the API has one admin token, without a name of its own.
const WHO: &str = "admin";

fn unavailable(e: &AnnouncementError) -> Response {
    warn!(error = %e, "announcements store failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": e.to_string()})),
    )
        .into_response()
}

/// `POST /admin/announcements`.
pub(crate) async fn post(State(s): State<ApiState>, body: axum::body::Bytes) -> Response {
    let spec: AnnouncementSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("body: {e}")})),
            )
                .into_response()
        }
    };
    let board = &s.announcements;
    let now = board.now();
    let menu = s.menu.get();
    let menu_services: Vec<String> = crate::api::open311::services(&menu.file)
        .into_iter()
        .map(|s| s.action.service)
        .collect();
    let others = match announcements::current(board.pool(), now).await {
        Ok(o) => o,
        Err(e) => return unavailable(&e),
    };
    let can_speak = board.can_speak();
    let valid = match tokio::task::spawn_blocking(move || {
        announcements::validate(
            spec,
            &menu.file,
            &menu.main,
            &menu_services,
            &others,
            can_speak,
            now,
        )
    })
    .await
    {
        Ok(Ok(v)) => v,
        Ok(Err(AnnouncementError::Invalid(errors))) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": "announcement refused", "errors": errors})),
            )
                .into_response()
        }
        Ok(Err(e)) => return unavailable(&e),
        Err(_) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": "validation stopped"})),
            )
                .into_response()
        }
    };
    let id = match announcements::insert(board.pool(), &valid, WHO, now).await {
        Ok(id) => id,
        Err(e) => return unavailable(&e),
    };
    let keys: Vec<&str> = valid.spec.entries.iter().map(|e| e.key.as_str()).collect();
    let languages: Vec<&String> = valid.spec.messages.keys().collect();
    info!(
        target: "ivr311::audit",
        who = WHO,
        id,
        starts_at = %valid.starts_at,
        ends_at = %valid.ends_at,
        ?languages,
        ?keys,
        "announcement set"
    );
    if let Err(e) = board.refresh().await {
        warn!(error = %e, "announcements not reloaded after a change; the periodic reload will");
    }
    let stored = board
        .snapshot()
        .announcements
        .iter()
        .find(|a| a.id == id)
        .map(|a| a.view(now))
        .unwrap_or_else(|| json!({"id": id}));
    (StatusCode::CREATED, Json(stored)).into_response()
}

/// `GET /admin/announcements`.
pub(crate) async fn list(State(s): State<ApiState>) -> Response {
    let now = s.announcements.now();
    match announcements::current(s.announcements.pool(), now).await {
        Ok(rows) => Json(rows.iter().map(|a| a.view(now)).collect::<Vec<_>>()).into_response(),
        Err(e) => unavailable(&e),
    }
}

/// `DELETE /admin/announcements/{id}`.
pub(crate) async fn delete(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("{id:?} is not an announcement id")})),
        )
            .into_response();
    };
    let board = &s.announcements;
    let now = board.now();
    match announcements::end(board.pool(), id, WHO, now).await {
        Ok(true) => {
            info!(target: "ivr311::audit", who = WHO, id, ended_at = %now, "announcement ended");
            if let Err(e) = board.refresh().await {
                warn!(error = %e, "announcements not reloaded after a change; the periodic reload will");
            }
            Json(json!({"id": id, "state": "ended", "ended_at": now.to_string()})).into_response()
        }
        Ok(false) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such announcement running or scheduled"})),
        )
            .into_response(),
        Err(e) => unavailable(&e),
    }
}
