//! `GET /admin/reports/calls` and `GET /admin/reports/agents`: the reports of
//! [`crate::history::report`] over HTTP, as JSON or CSV. Behind the admin API's
//! authorisation (they are routed in [`super::admin`]).
//!
//! Query: `from`, `to` (a date `2026-11-30`, or RFC 3339 `2026-11-30T08:00:00Z`; UTC; `to`
//! is exclusive, a date means its midnight; default: the 24 hours up to the end of the
//! current interval), `interval` (`15m`,
//! `hour`, `day`; default `hour`), `queue` (one queue), `format` (`json`, the default, or
//! `csv`). At most 400 days at a time.

use super::ApiState;
use crate::history::report::{self, AgentsReport, CallsReport, Interval, Range};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use std::fmt::Write as _;

/// The longest range a report covers.
const MAX_DAYS: i64 = 400;
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    from: Option<String>,
    to: Option<String>,
    interval: Option<Interval>,
    queue: Option<String>,
    format: Option<Format>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Format {
    Json,
    Csv,
}

/// A time as a query gives it: a date (its midnight, UTC) or RFC 3339.
pub fn parse_time(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Some((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let d = time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    Some(d.midnight().assume_utc().unix_timestamp() * 1000)
}

/// Why a report's query was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("{name}: {value:?} is not a date (2026-11-30) or an RFC 3339 time")]
    Time { name: &'static str, value: String },
    #[error("from must be before to")]
    Order,
    #[error("at most {MAX_DAYS} days at a time")]
    TooLong,
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

impl ReportQuery {
    fn range(&self) -> Result<Range, QueryError> {
        let time = |name: &'static str, v: &Option<String>| match v {
            None => Ok(None),
            Some(s) => parse_time(s).map(Some).ok_or_else(|| QueryError::Time {
                name,
                value: s.clone(),
            }),
        };
        let interval = self.interval.unwrap_or(Interval::Hour);
        // By default the 24 hours up to the end of the current interval, on interval
        // boundaries.
        let to = time("to", &self.to)?.unwrap_or_else(|| {
            let now = crate::history::epoch_ms_now();
            let step = interval.millis();
            now - now.rem_euclid(step) + step
        });
        let from = time("from", &self.from)?.unwrap_or(to - DAY_MS);
        if from >= to {
            return Err(QueryError::Order);
        }
        if to - from > MAX_DAYS * DAY_MS {
            return Err(QueryError::TooLong);
        }
        Ok(Range {
            from_ms: from,
            to_ms: to,
            interval,
            queue: self.queue.clone(),
        })
    }
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": format!("report: {e}") })),
    )
        .into_response()
}

fn csv_response(body: String, name: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.csv\""),
            ),
        ],
        body,
    )
        .into_response()
}

/// A CSV field: quoted when it holds a comma, quote or line break; a leading `=`, `+`, `-`
/// or `@` is prefixed with `'` so a spreadsheet never runs it as a formula.
pub fn csv_field(s: &str) -> String {
    let s = match s.chars().next() {
        Some('=' | '+' | '-' | '@') => format!("'{s}"),
        _ => s.to_owned(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_default()
}

/// `GET /admin/reports/calls`.
pub async fn calls(State(s): State<ApiState>, q: Query<ReportQuery>) -> Response {
    let range = match q.range() {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let report = match report::calls(s.tickets.pool(), &s.reports, &range).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    match q.format {
        Some(Format::Csv) => csv_response(calls_csv(&report), "calls"),
        _ => Json(report).into_response(),
    }
}

/// The calls report as CSV: a line per interval, then `total`.
pub fn calls_csv(r: &CallsReport) -> String {
    let mut out = String::from(
        "interval_start,calls,answered_by_ivr,rejected,offered,answered,abandoned,\
         short_abandoned,answered_within_target,service_level,asa_seconds,aht_seconds,\
         longest_wait_seconds,callbacks_requested,callbacks_completed,callbacks_unreached,\
         emergency_redirects,\
         tickets,tickets_by_service,self_service,self_service_rate\n",
    );
    for row in r.rows.iter().chain(std::iter::once(&r.total)) {
        let services: Vec<String> = row
            .tickets_by_service
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            row.interval_start,
            row.calls,
            row.answered_by_ivr,
            row.rejected,
            row.offered,
            row.answered,
            row.abandoned,
            row.short_abandoned,
            row.answered_within_target,
            opt(row.service_level),
            opt(row.asa_seconds),
            opt(row.aht_seconds),
            row.longest_wait_seconds,
            row.callbacks_requested,
            row.callbacks_completed,
            row.callbacks_unreached,
            row.emergency_redirects,
            row.tickets,
            csv_field(&services.join(";")),
            row.self_service,
            opt(row.self_service_rate),
        );
    }
    out
}

/// `GET /admin/reports/agents`.
pub async fn agents(State(s): State<ApiState>, q: Query<ReportQuery>) -> Response {
    let range = match q.range() {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let report = match report::agents(s.tickets.pool(), &range).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    match q.format {
        Some(Format::Csv) => csv_response(agents_csv(&report), "agents"),
        _ => Json(report).into_response(),
    }
}

/// The agents report as CSV: a line per operator per interval, then one `total` per operator.
pub fn agents_csv(r: &AgentsReport) -> String {
    let mut out = String::from(
        "interval_start,agent,calls,talk_seconds,wrap_up_seconds,ready_seconds,\
         not_ready_seconds,logged_in_seconds,occupancy\n",
    );
    for row in r.rows.iter().chain(&r.totals) {
        let not_ready: Vec<String> = row
            .not_ready_seconds
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            row.interval_start,
            csv_field(&row.agent),
            row.calls,
            row.talk_seconds,
            row.wrap_up_seconds,
            row.ready_seconds,
            csv_field(&not_ready.join(";")),
            row.logged_in_seconds,
            opt(row.occupancy),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_dates_or_rfc3339() {
        assert_eq!(parse_time("2026-11-30"), Some(1_795_996_800_000));
        assert_eq!(
            parse_time("2026-11-30T01:00:00Z"),
            Some(1_795_996_800_000 + 3_600_000)
        );
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("potholes=2;graffiti=1"), "potholes=2;graffiti=1");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
    }
}
