//! The figures residents see (`/dashboard`, `/open-data/*`): service requests by week and
//! service, time to close, open requests by age, and the call centre's daily service level,
//! speed of answer and abandonment.
//!
//! Nothing here is personal or call-level: every figure is a count or a statistic over many
//! requests or calls, and any count from 1 to 4 (and any rate, average or median computed
//! over fewer than 5) is published as `null` ([`MIN_CELL`]), so no cell can single out a
//! caller. No totals are published over suppressed cells (a total would give them back).

use super::report::{self, Interval, Range, ReportsConfig};
use super::HistoryError;
use crate::dispatch::db;
use serde::Serialize;
use sqlx::AnyPool;

/// Counts below this (and above zero) are suppressed.
pub const MIN_CELL: u64 = 5;
/// Weeks of service requests published.
pub const WEEKS: i64 = 26;
/// Days of call-centre figures published.
pub const DAYS: i64 = 90;

/// A count as published: `None` when from 1 to [`MIN_CELL`] − 1.
pub fn cell(n: u64) -> Option<u64> {
    (n == 0 || n >= MIN_CELL).then_some(n)
}

/// A statistic over `n` items, published only when `n` ≥ [`MIN_CELL`].
fn over<T>(n: u64, v: Option<T>) -> Option<T> {
    if n >= MIN_CELL {
        v
    } else {
        None
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WeeklyRequests {
    /// Monday of the week (UTC).
    pub week_start: String,
    pub service_code: String,
    pub service_name: String,
    pub opened: Option<u64>,
    pub closed: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimeToClose {
    pub service_code: String,
    pub service_name: String,
    /// Requests closed in the last [`WEEKS`] weeks.
    pub closed: Option<u64>,
    pub median_days: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OpenByAge {
    pub service_code: String,
    pub service_name: String,
    pub days_0_7: Option<u64>,
    pub days_8_30: Option<u64>,
    pub days_31_90: Option<u64>,
    pub days_over_90: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CallCentreDay {
    pub date: String,
    pub calls: Option<u64>,
    pub offered: Option<u64>,
    pub answered: Option<u64>,
    pub abandoned: Option<u64>,
    pub service_level: Option<f64>,
    pub asa_seconds: Option<f64>,
    pub abandonment_rate: Option<f64>,
}

/// Everything the dashboard shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OpenData {
    pub generated: String,
    pub min_cell: u64,
    pub requests_weekly: Vec<WeeklyRequests>,
    pub time_to_close: Vec<TimeToClose>,
    pub open_by_age: Vec<OpenByAge>,
    pub call_centre_daily: Vec<CallCentreDay>,
}

fn u(n: i64) -> u64 {
    n.max(0) as u64
}

/// The figures as of `now_ms`.
pub async fn compute(
    pool: &AnyPool,
    reports: &ReportsConfig,
    now_ms: i64,
) -> Result<OpenData, HistoryError> {
    let day = 86_400_000;
    // Ticket times are whole seconds: up to and including this one.
    let since = report::iso(now_ms - WEEKS * 7 * day);
    let now = report::iso(now_ms);
    // Opened and closed per week (a closed request's last update is when it was closed).
    let rows: Vec<(String, String, String, i64, i64)> = sqlx::query_as(&db::sql(
        pool,
        &format!(
            "SELECT week, service_code, max(service_name), count(*) FILTER (WHERE opened = 1),
                count(*) FILTER (WHERE opened = 0) FROM (
            SELECT {} AS week, service_code, service_name, 1 AS opened
            FROM tickets WHERE requested_datetime >= ?1 AND requested_datetime <= ?2
            UNION ALL
            SELECT {}, service_code, service_name, 0
            FROM tickets WHERE status = 'closed' AND updated_datetime >= ?1
                AND updated_datetime <= ?2
         ) AS w GROUP BY week, service_code ORDER BY week, service_code",
            db::week_start(pool, "requested_datetime"),
            db::week_start(pool, "updated_datetime"),
        ),
    ))
    .bind(&since)
    .bind(&now)
    .fetch_all(pool)
    .await?;
    let requests_weekly = rows
        .into_iter()
        .map(|(week, code, name, opened, closed)| WeeklyRequests {
            week_start: week,
            service_code: code,
            service_name: name,
            opened: cell(u(opened)),
            closed: cell(u(closed)),
        })
        .collect();

    // Days from request to close, per service, over requests closed in the period.
    let rows: Vec<(String, String, f64)> = sqlx::query_as(&db::sql(
        pool,
        &format!(
            "SELECT service_code, service_name, {}
         FROM tickets WHERE status = 'closed' AND updated_datetime >= ?1
            AND updated_datetime <= ?2
         ORDER BY service_code",
            db::days_between(pool, "updated_datetime", "requested_datetime"),
        ),
    ))
    .bind(&since)
    .bind(&now)
    .fetch_all(pool)
    .await?;
    let mut time_to_close: Vec<TimeToClose> = Vec::new();
    let mut days: Vec<f64> = Vec::new();
    let flush = |out: &mut Vec<TimeToClose>, code: String, name: String, d: &mut Vec<f64>| {
        let n = d.len() as u64;
        out.push(TimeToClose {
            service_code: code,
            service_name: name,
            closed: cell(n),
            median_days: over(n, median(d)),
        });
        d.clear();
    };
    let mut current: Option<(String, String)> = None;
    for (code, name, d) in rows {
        if current.as_ref().is_some_and(|(c, _)| *c != code) {
            if let Some((c, n)) = current.take() {
                flush(&mut time_to_close, c, n, &mut days);
            }
        }
        if current.is_none() {
            current = Some((code, name));
        }
        days.push(d.max(0.0));
    }
    if let Some((c, n)) = current.take() {
        flush(&mut time_to_close, c, n, &mut days);
    }

    // Open requests by age.
    let rows: Vec<(String, String, i64, i64, i64, i64)> = sqlx::query_as(&db::sql(
        pool,
        &format!(
            "SELECT service_code, max(service_name),
            count(*) FILTER (WHERE age <= 7), count(*) FILTER (WHERE age > 7 AND age <= 30),
            count(*) FILTER (WHERE age > 30 AND age <= 90), count(*) FILTER (WHERE age > 90)
         FROM (SELECT service_code, service_name, {} AS age
               FROM tickets WHERE status = 'open') AS o
         GROUP BY service_code ORDER BY service_code",
            db::days_between(pool, "?1", "requested_datetime"),
        ),
    ))
    .bind(&now)
    .fetch_all(pool)
    .await?;
    let open_by_age = rows
        .into_iter()
        .map(|(code, name, a, b, c, d)| OpenByAge {
            service_code: code,
            service_name: name,
            days_0_7: cell(u(a)),
            days_8_30: cell(u(b)),
            days_31_90: cell(u(c)),
            days_over_90: cell(u(d)),
        })
        .collect();

    // The call centre, per day (UTC), the last DAYS days including today.
    let today = now_ms - now_ms.rem_euclid(day);
    let range = Range {
        from_ms: today - (DAYS - 1) * day,
        to_ms: today + day,
        interval: Interval::Day,
        queue: None,
    };
    let sums = report::call_sums(pool, reports, &range).await?;
    let call_centre_daily = sums
        .iter()
        .map(|(start, s)| {
            let counted = s.offered.saturating_sub(s.short_abandoned);
            CallCentreDay {
                date: report::iso(*start)[..10].to_owned(),
                calls: cell(s.calls),
                offered: cell(s.offered),
                answered: cell(s.answered),
                abandoned: cell(s.abandoned()),
                service_level: over(counted, s.service_level()),
                asa_seconds: over(s.answered, s.asa_seconds()),
                abandonment_rate: over(
                    s.offered,
                    (s.offered > 0).then(|| s.abandoned() as f64 / s.offered as f64),
                ),
            }
        })
        .collect();
    Ok(OpenData {
        generated: now,
        min_cell: MIN_CELL,
        requests_weekly,
        time_to_close,
        open_by_age,
        call_centre_daily,
    })
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_one_to_four_are_suppressed() {
        assert_eq!(cell(0), Some(0));
        for n in 1..5 {
            assert_eq!(cell(n), None, "{n}");
        }
        assert_eq!(cell(5), Some(5));
        assert_eq!(over(4, Some(1.5)), None);
        assert_eq!(over(5, Some(1.5)), Some(1.5));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
