//! The transparency page for residents, no login: `/dashboard` (HTML, CSS and JS embedded in
//! the binary from `web/`, nothing from a CDN) and the same figures as open data under
//! `/open-data/` (see [`crate::history::open_data`] for what is published and how small
//! counts are suppressed).
//!
//! | path | what |
//! | --- | --- |
//! | `/dashboard` | the page; it reads `/open-data/dashboard.json` |
//! | `/open-data/dashboard.json` | everything below in one document |
//! | `/open-data/requests-weekly.csv`, `.json` | service requests opened and closed per week (Monday, UTC) and service, the last 26 weeks |
//! | `/open-data/time-to-close.csv`, `.json` | per service: requests closed in the last 26 weeks, median days from request to close |
//! | `/open-data/open-by-age.csv`, `.json` | per service: open requests by age (0–7, 8–30, 31–90, over 90 days) |
//! | `/open-data/call-centre-daily.csv`, `.json` | per day (UTC), the last 90 days: calls, offered to operators, answered, abandoned, service level, average speed of answer, abandonment rate |
//!
//! The figures are computed at most once a minute (whatever the number of visitors), so the
//! page cannot be used to load the database.

use super::ApiState;
use crate::history::open_data::{self, OpenData};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: &str = include_str!("../../web/dashboard.html");
const SCRIPT: &str = include_str!("../../web/dashboard.js");
const STYLE: &str = include_str!("../../web/dashboard.css");

/// How long computed figures are served before they are computed again.
const FRESH_FOR: Duration = Duration::from_secs(60);

/// The figures last computed.
#[derive(Default)]
pub struct OpenDataCache {
    // An async mutex held across the computation on purpose: one visitor computes, the
    // others wait for that result instead of each running the queries.
    last: tokio::sync::Mutex<Option<(Instant, Arc<OpenData>)>>,
}

impl OpenDataCache {
    async fn get(&self, s: &ApiState) -> Result<Arc<OpenData>, crate::history::HistoryError> {
        let mut last = self.last.lock().await;
        if let Some((at, data)) = last.as_ref() {
            if at.elapsed() < FRESH_FOR {
                return Ok(data.clone());
            }
        }
        let data = Arc::new(
            open_data::compute(s.tickets.pool(), &s.reports, crate::history::epoch_ms_now())
                .await?,
        );
        *last = Some((Instant::now(), data.clone()));
        Ok(data)
    }
}

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/style.css", get(style))
        .route("/open-data/{file}", get(file))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; frame-ancestors 'none'",
        ),
    );
    r
}

async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

async fn file(State(s): State<ApiState>, Path(file): Path<String>) -> Response {
    let Some((name, ext)) = file.rsplit_once('.') else {
        return not_found();
    };
    if !matches!(ext, "csv" | "json") {
        return not_found();
    }
    let known = [
        "dashboard",
        "requests-weekly",
        "time-to-close",
        "open-by-age",
        "call-centre-daily",
    ];
    if !known.contains(&name) || (name == "dashboard" && ext == "csv") {
        return not_found();
    }
    let data = match s.open_data.get(&s).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "open data could not be computed");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "open data is unavailable right now"})),
            )
                .into_response();
        }
    };
    let d = &*data;
    if ext == "json" {
        let v = match name {
            "requests-weekly" => json!(d.requests_weekly),
            "time-to-close" => json!(d.time_to_close),
            "open-by-age" => json!(d.open_by_age),
            "call-centre-daily" => json!(d.call_centre_daily),
            _ => json!(d),
        };
        let mut r = Json(v).into_response();
        r.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        return r;
    }
    let body = match name {
        "requests-weekly" => csv(
            "week_start,service_code,service_name,opened,closed",
            d.requests_weekly.iter().map(|r| {
                vec![
                    r.week_start.clone(),
                    r.service_code.clone(),
                    r.service_name.clone(),
                    num(r.opened),
                    num(r.closed),
                ]
            }),
        ),
        "time-to-close" => csv(
            "service_code,service_name,closed,median_days",
            d.time_to_close.iter().map(|r| {
                vec![
                    r.service_code.clone(),
                    r.service_name.clone(),
                    num(r.closed),
                    float(r.median_days),
                ]
            }),
        ),
        "open-by-age" => csv(
            "service_code,service_name,days_0_7,days_8_30,days_31_90,days_over_90",
            d.open_by_age.iter().map(|r| {
                vec![
                    r.service_code.clone(),
                    r.service_name.clone(),
                    num(r.days_0_7),
                    num(r.days_8_30),
                    num(r.days_31_90),
                    num(r.days_over_90),
                ]
            }),
        ),
        _ => csv(
            "date,calls,offered,answered,abandoned,service_level,asa_seconds,abandonment_rate",
            d.call_centre_daily.iter().map(|r| {
                vec![
                    r.date.clone(),
                    num(r.calls),
                    num(r.offered),
                    num(r.answered),
                    num(r.abandoned),
                    float(r.service_level),
                    float(r.asa_seconds),
                    float(r.abandonment_rate),
                ]
            }),
        ),
    };
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        body,
    )
        .into_response()
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "no such file"})),
    )
        .into_response()
}

/// A suppressed cell is empty in CSV (`null` in JSON).
fn num(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn float(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_default()
}

fn csv(header: &str, rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut out = String::from(header);
    out.push('\n');
    for row in rows {
        let fields: Vec<String> = row.iter().map(|f| super::reports::csv_field(f)).collect();
        let _ = writeln!(out, "{}", fields.join(","));
    }
    out
}
