//! Reports computed from the history: per interval (15 minutes, an hour, a day; UTC), for the
//! admin API (`/admin/reports/calls`, `/admin/reports/agents`) and the public dashboard.
//!
//! Every figure is computed from `call_history` and `agent_states` only, so reports survive
//! restarts and agree with each other. A call counts in the interval it *started* in (its
//! INVITE). The formulas (also in the README):
//!
//! | figure | formula |
//! | --- | --- |
//! | `calls` | every call, refused ones too |
//! | `answered_by_ivr` | calls we answered (200 OK) |
//! | `rejected` | calls refused before the answer (503 overload or draining, 488) |
//! | `offered` | calls that entered an operator queue |
//! | `answered` | offered calls an operator answered |
//! | `abandoned` | offered − answered − call-backs requested: left the queue without an operator (hung up, or chose a ticket or 911 while waiting) |
//! | `short_abandoned` | abandoned after waiting less than `reports.short_abandon_seconds` (default 5) |
//! | `answered_within_target` | answered after waiting at most the queue's service-level target (`reports.service_level_seconds`, default 30, per queue in `reports.queue_service_level_seconds`) |
//! | `service_level` | answered_within_target ÷ (offered − short_abandoned) |
//! | `asa_seconds` | average speed of answer: Σ wait of answered calls ÷ answered |
//! | `aht_seconds` | average handle time: Σ (talk + wrap-up) of answered calls ÷ answered |
//! | `longest_wait_seconds` | the longest wait of any offered call (answered or not) |
//! | `callbacks_requested` | offered calls that asked for a call-back keeping their place |
//! | `callbacks_completed` | of those, the ones where the caller answered the call-back and talked to an operator |
//! | `callbacks_unreached` | of those, the ones whose caller answered none of the attempts (a flagged ticket was filed) |
//! | `emergency_redirects` | calls sent to 911 |
//! | `tickets`, `tickets_by_service` | calls that filed a ticket, by service code |
//! | `self_service` | answered calls that ended in the IVR with a ticket or information, never with an operator |
//! | `self_service_rate` | self_service ÷ answered_by_ivr |
//!
//! Per operator (`/admin/reports/agents`), from the operator's state spans (cut at the
//! interval's edges) and the calls they answered:
//!
//! | figure | formula |
//! | --- | --- |
//! | `calls`, `talk_seconds`, `wrap_up_seconds` | calls answered; Σ talk of those calls; Σ time in `wrap_up` |
//! | `ready_seconds` | Σ time `available` (ready, no call) |
//! | `not_ready_seconds` | Σ time `paused` by reason, and `no_answer_pause` as reason `no answer` |
//! | `logged_in_seconds` | Σ time in any state but `logged_out` |
//! | `occupancy` | (on-call + wrap-up time) ÷ (on-call + wrap-up + ringing + ready time) |
//!
//! A ratio whose denominator is zero is `null`.

use crate::dispatch::db;
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use std::collections::BTreeMap;

use super::HistoryError;

/// The `reports:` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReportsConfig {
    /// Callers who leave the queue before this many seconds are short abandons, counted
    /// apart and left out of the service level. Default 5.
    pub short_abandon_seconds: u64,
    /// A call answered within this many seconds counts towards the service level. Default 30.
    pub service_level_seconds: u64,
    /// Per queue, a target other than `service_level_seconds` (`{general: 60}`).
    pub queue_service_level_seconds: BTreeMap<String, u64>,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        ReportsConfig {
            short_abandon_seconds: 5,
            service_level_seconds: 30,
            queue_service_level_seconds: BTreeMap::new(),
        }
    }
}

/// A report's interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Interval {
    #[serde(rename = "15m")]
    FifteenMinutes,
    #[serde(rename = "hour")]
    Hour,
    #[serde(rename = "day")]
    Day,
}

impl Interval {
    pub fn millis(self) -> i64 {
        match self {
            Interval::FifteenMinutes => 900_000,
            Interval::Hour => 3_600_000,
            Interval::Day => 86_400_000,
        }
    }
}

/// What to report on: `[from, to)` in epoch ms, by `interval`, optionally one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub from_ms: i64,
    pub to_ms: i64,
    pub interval: Interval,
    pub queue: Option<String>,
}

/// The sums a calls report is computed from (one interval, or the total).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallSums {
    pub calls: u64,
    pub answered_by_ivr: u64,
    pub rejected: u64,
    pub offered: u64,
    pub answered: u64,
    pub callbacks_requested: u64,
    pub unanswered: u64,
    pub short_abandoned: u64,
    pub answered_within_target: u64,
    pub answered_wait_ms: i64,
    pub handle_ms: i64,
    pub longest_wait_ms: i64,
    pub callbacks_completed: u64,
    pub callbacks_unreached: u64,
    pub emergency_redirects: u64,
    pub tickets: u64,
    pub self_service: u64,
    pub tickets_by_service: BTreeMap<String, u64>,
}

impl CallSums {
    fn add(&mut self, o: &CallSums) {
        self.calls += o.calls;
        self.answered_by_ivr += o.answered_by_ivr;
        self.rejected += o.rejected;
        self.offered += o.offered;
        self.answered += o.answered;
        self.callbacks_requested += o.callbacks_requested;
        self.unanswered += o.unanswered;
        self.short_abandoned += o.short_abandoned;
        self.answered_within_target += o.answered_within_target;
        self.answered_wait_ms += o.answered_wait_ms;
        self.handle_ms += o.handle_ms;
        self.longest_wait_ms = self.longest_wait_ms.max(o.longest_wait_ms);
        self.callbacks_completed += o.callbacks_completed;
        self.callbacks_unreached += o.callbacks_unreached;
        self.emergency_redirects += o.emergency_redirects;
        self.tickets += o.tickets;
        self.self_service += o.self_service;
        for (k, v) in &o.tickets_by_service {
            *self.tickets_by_service.entry(k.clone()).or_default() += v;
        }
    }

    /// offered − answered − call-backs requested.
    pub fn abandoned(&self) -> u64 {
        self.unanswered
    }

    /// answered_within_target ÷ (offered − short_abandoned).
    pub fn service_level(&self) -> Option<f64> {
        ratio(
            self.answered_within_target,
            self.offered.saturating_sub(self.short_abandoned),
        )
    }

    /// Σ wait of answered calls ÷ answered, seconds.
    pub fn asa_seconds(&self) -> Option<f64> {
        ratio_ms(self.answered_wait_ms, self.answered)
    }

    /// Σ (talk + wrap-up) of answered calls ÷ answered, seconds.
    pub fn aht_seconds(&self) -> Option<f64> {
        ratio_ms(self.handle_ms, self.answered)
    }

    /// self_service ÷ answered_by_ivr.
    pub fn self_service_rate(&self) -> Option<f64> {
        ratio(self.self_service, self.answered_by_ivr)
    }
}

fn ratio(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

fn ratio_ms(n_ms: i64, d: u64) -> Option<f64> {
    (d > 0).then(|| n_ms as f64 / 1000.0 / d as f64)
}

/// One line of a calls report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CallsRow {
    /// The interval's start (ISO 8601 UTC), or `total`.
    pub interval_start: String,
    pub calls: u64,
    pub answered_by_ivr: u64,
    pub rejected: u64,
    pub offered: u64,
    pub answered: u64,
    pub abandoned: u64,
    pub short_abandoned: u64,
    pub answered_within_target: u64,
    pub service_level: Option<f64>,
    pub asa_seconds: Option<f64>,
    pub aht_seconds: Option<f64>,
    pub longest_wait_seconds: f64,
    pub callbacks_requested: u64,
    pub callbacks_completed: u64,
    pub callbacks_unreached: u64,
    pub emergency_redirects: u64,
    pub tickets: u64,
    pub tickets_by_service: BTreeMap<String, u64>,
    pub self_service: u64,
    pub self_service_rate: Option<f64>,
}

impl CallsRow {
    fn new(interval_start: String, s: &CallSums) -> CallsRow {
        CallsRow {
            interval_start,
            calls: s.calls,
            answered_by_ivr: s.answered_by_ivr,
            rejected: s.rejected,
            offered: s.offered,
            answered: s.answered,
            abandoned: s.abandoned(),
            short_abandoned: s.short_abandoned,
            answered_within_target: s.answered_within_target,
            service_level: s.service_level(),
            asa_seconds: s.asa_seconds(),
            aht_seconds: s.aht_seconds(),
            longest_wait_seconds: s.longest_wait_ms as f64 / 1000.0,
            callbacks_requested: s.callbacks_requested,
            callbacks_completed: s.callbacks_completed,
            callbacks_unreached: s.callbacks_unreached,
            emergency_redirects: s.emergency_redirects,
            tickets: s.tickets,
            tickets_by_service: s.tickets_by_service.clone(),
            self_service: s.self_service,
            self_service_rate: s.self_service_rate(),
        }
    }
}

/// A calls report: one row per interval with calls, then the total.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CallsReport {
    pub from: String,
    pub to: String,
    pub interval: Interval,
    pub queue: Option<String>,
    pub rows: Vec<CallsRow>,
    pub total: CallsRow,
}

/// ISO 8601 UTC, whole seconds, of epoch ms.
pub fn iso(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The calls report over `range`.
pub async fn calls(
    pool: &AnyPool,
    config: &ReportsConfig,
    range: &Range,
) -> Result<CallsReport, HistoryError> {
    let by_bucket = call_sums(pool, config, range).await?;
    let mut total = CallSums::default();
    let mut rows = Vec::with_capacity(by_bucket.len());
    for (b, s) in &by_bucket {
        total.add(s);
        rows.push(CallsRow::new(iso(*b), s));
    }
    Ok(CallsReport {
        from: iso(range.from_ms),
        to: iso(range.to_ms),
        interval: range.interval,
        queue: range.queue.clone(),
        rows,
        total: CallsRow::new("total".into(), &total),
    })
}

/// The sums per interval start (epoch ms).
/// The aggregates of [`CallSums`] over `call_history` rows, named as its fields, with these
/// SQL expressions for the short-abandon limit and the service-level target (ms).
///
/// Written for both databases: `count(*) FILTER (WHERE …)` counts rows that match (SQLite
/// would also sum a boolean; PostgreSQL has no sum of booleans), and sums are cast back to
/// BIGINT (PostgreSQL sums BIGINT into NUMERIC).
pub(crate) fn sums_columns(short: &str, target: &str) -> String {
    let n = |cond: &str| format!("count(*) FILTER (WHERE {cond})");
    let s = |expr: &str| format!("CAST(coalesce(sum({expr}), 0) AS BIGINT)");
    format!(
        "count(*) AS calls,
            {} AS answered_by_ivr,
            {} AS rejected,
            {} AS offered,
            {} AS answered,
            {} AS callbacks_requested,
            {} AS unanswered,
            {} AS short_abandoned,
            {} AS answered_within_target,
            {} AS answered_wait_ms,
            {} AS handle_ms,
            coalesce(max(CASE WHEN queue IS NOT NULL THEN wait_ms END), 0) AS longest_wait_ms,
            {} AS callbacks_completed,
            {} AS callbacks_unreached,
            {} AS emergency_redirects,
            {} AS tickets,
            {} AS self_service",
        n("answered_ms IS NOT NULL"),
        n("outcome = 'rejected'"),
        n("queue IS NOT NULL"),
        n("queue IS NOT NULL AND agent IS NOT NULL"),
        n("queue IS NOT NULL AND outcome = 'callback'"),
        n("queue IS NOT NULL AND agent IS NULL AND outcome <> 'callback'"),
        n(&format!(
            "queue IS NOT NULL AND agent IS NULL AND outcome <> 'callback' AND wait_ms < {short}"
        )),
        n(&format!(
            "queue IS NOT NULL AND agent IS NOT NULL AND wait_ms <= {target}"
        )),
        s("CASE WHEN queue IS NOT NULL AND agent IS NOT NULL THEN wait_ms END"),
        s("CASE WHEN queue IS NOT NULL AND agent IS NOT NULL \
           THEN coalesce(talk_ms, 0) + coalesce(wrap_up_ms, 0) END"),
        n("outcome = 'callback' AND callback_result = 'served'"),
        n("outcome = 'callback' AND callback_result = 'unreached'"),
        n("outcome = 'emergency'"),
        n("outcome = 'ticket'"),
        n("answered_ms IS NOT NULL AND agent IS NULL AND outcome IN ('ticket', 'info')"),
    )
}

/// The sums per interval start (epoch ms). A range on 15-minute boundaries (UTC) is read
/// from the rollup the writer keeps ([`super::rollup`]) once it is built for `config`'s
/// thresholds; any other from `call_history`.
pub async fn call_sums(
    pool: &AnyPool,
    config: &ReportsConfig,
    range: &Range,
) -> Result<BTreeMap<i64, CallSums>, HistoryError> {
    if super::rollup::serves(range) && super::rollup::ready(pool, config).await? {
        super::rollup::call_sums(pool, range).await
    } else {
        call_sums_raw(pool, config, range).await
    }
}

/// [`call_sums`] from `call_history` itself.
pub async fn call_sums_raw(
    pool: &AnyPool,
    config: &ReportsConfig,
    range: &Range,
) -> Result<BTreeMap<i64, CallSums>, HistoryError> {
    let step = range.interval.millis();
    // The service-level target per queue, as a CASE over bound values.
    // Parameters: ?1 from, ?2 step, ?3 short abandon, ?4 to, then (queue, target) pairs,
    // the default target, and the queue asked for.
    let mut target = String::from("CASE queue");
    let mut n = 5;
    for _ in &config.queue_service_level_seconds {
        target.push_str(&format!(" WHEN ?{} THEN ?{}", n, n + 1));
        n += 2;
    }
    if config.queue_service_level_seconds.is_empty() {
        target = format!("?{n}");
    } else {
        target.push_str(&format!(" ELSE ?{n} END"));
    }
    let filter = if range.queue.is_some() {
        format!(" AND queue = ?{}", n + 1)
    } else {
        String::new()
    };
    let columns = sums_columns("?3", &target);
    let sql = format!(
        "SELECT (started_ms - ?1) / ?2 AS b,
            {columns}
         FROM call_history
         WHERE started_ms >= ?1 AND started_ms < ?4{filter}
         GROUP BY b ORDER BY b"
    );
    let sql = db::sql(pool, &sql);
    let mut q = sqlx::query_as::<_, SumsRow>(&sql)
        .bind(range.from_ms)
        .bind(step)
        .bind(config.short_abandon_seconds as i64 * 1000)
        .bind(range.to_ms);
    for (name, secs) in &config.queue_service_level_seconds {
        q = q.bind(name.clone()).bind(*secs as i64 * 1000);
    }
    q = q.bind(config.service_level_seconds as i64 * 1000);
    if let Some(queue) = &range.queue {
        q = q.bind(queue.clone());
    }
    let mut out = BTreeMap::new();
    for r in q.fetch_all(pool).await? {
        out.insert(range.from_ms + r.b * step, r.sums());
    }
    let filter = if range.queue.is_some() {
        " AND queue = ?4"
    } else {
        ""
    };
    let sql = format!(
        "SELECT (started_ms - ?1) / ?2 AS b, ticket_service, count(*) FROM call_history
         WHERE started_ms >= ?1 AND started_ms < ?3 AND outcome = 'ticket'{filter}
         GROUP BY b, ticket_service"
    );
    let sql = db::sql(pool, &sql);
    let mut q = sqlx::query_as::<_, (i64, Option<String>, i64)>(&sql)
        .bind(range.from_ms)
        .bind(step)
        .bind(range.to_ms);
    if let Some(queue) = &range.queue {
        q = q.bind(queue.clone());
    }
    for (b, service, n) in q.fetch_all(pool).await? {
        if let Some(s) = out.get_mut(&(range.from_ms + b * step)) {
            s.tickets_by_service
                .insert(service.unwrap_or_default(), n.max(0) as u64);
        }
    }
    Ok(out)
}

impl SumsRow {
    pub(crate) fn sums(&self) -> CallSums {
        let r = self;
        let u = |v: i64| v.max(0) as u64;
        CallSums {
            calls: u(r.calls),
            answered_by_ivr: u(r.answered_by_ivr),
            rejected: u(r.rejected),
            offered: u(r.offered),
            answered: u(r.answered),
            callbacks_requested: u(r.callbacks_requested),
            unanswered: u(r.unanswered),
            short_abandoned: u(r.short_abandoned),
            answered_within_target: u(r.answered_within_target),
            answered_wait_ms: r.answered_wait_ms,
            handle_ms: r.handle_ms,
            longest_wait_ms: r.longest_wait_ms,
            callbacks_completed: u(r.callbacks_completed),
            callbacks_unreached: u(r.callbacks_unreached),
            emergency_redirects: u(r.emergency_redirects),
            tickets: u(r.tickets),
            self_service: u(r.self_service),
            tickets_by_service: BTreeMap::new(),
        }
    }
}

/// One interval's sums as the database gives them.
#[derive(sqlx::FromRow)]
pub(crate) struct SumsRow {
    pub(crate) b: i64,
    calls: i64,
    answered_by_ivr: i64,
    rejected: i64,
    offered: i64,
    answered: i64,
    callbacks_requested: i64,
    unanswered: i64,
    short_abandoned: i64,
    answered_within_target: i64,
    answered_wait_ms: i64,
    handle_ms: i64,
    longest_wait_ms: i64,
    callbacks_completed: i64,
    callbacks_unreached: i64,
    emergency_redirects: i64,
    tickets: i64,
    self_service: i64,
}

/// One operator over one interval.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AgentRow {
    pub interval_start: String,
    pub agent: String,
    pub calls: u64,
    pub talk_seconds: f64,
    pub wrap_up_seconds: f64,
    pub ready_seconds: f64,
    pub not_ready_seconds: BTreeMap<String, f64>,
    pub logged_in_seconds: f64,
    pub occupancy: Option<f64>,
}

/// An agents report: a row per operator per interval with activity, then a total per operator.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgentsReport {
    pub from: String,
    pub to: String,
    pub interval: Interval,
    pub queue: Option<String>,
    pub rows: Vec<AgentRow>,
    pub totals: Vec<AgentRow>,
}

#[derive(Debug, Clone, Default)]
struct AgentSums {
    calls: u64,
    talk_ms: i64,
    /// By state (and `paused:<reason>`).
    states: BTreeMap<String, i64>,
}

impl AgentSums {
    fn add(&mut self, o: &AgentSums) {
        self.calls += o.calls;
        self.talk_ms += o.talk_ms;
        for (k, v) in &o.states {
            *self.states.entry(k.clone()).or_default() += v;
        }
    }

    fn row(&self, interval_start: String, agent: &str) -> AgentRow {
        let st = |k: &str| self.states.get(k).copied().unwrap_or(0);
        let (on_call, wrap, ringing, ready) =
            (st("on_call"), st("wrap_up"), st("ringing"), st("available"));
        let mut not_ready = BTreeMap::new();
        for (k, v) in &self.states {
            if let Some(reason) = k.strip_prefix("paused:") {
                *not_ready.entry(reason.to_owned()).or_default() += *v as f64 / 1000.0;
            }
        }
        let nap = st("no_answer_pause");
        if nap > 0 {
            *not_ready.entry("no answer".to_owned()).or_default() += nap as f64 / 1000.0;
        }
        let logged_in: i64 = self
            .states
            .iter()
            .filter(|(k, _)| k.as_str() != "logged_out")
            .map(|(_, v)| v)
            .sum();
        let busy = on_call + wrap;
        let denominator = busy + ringing + ready;
        AgentRow {
            interval_start,
            agent: agent.to_owned(),
            calls: self.calls,
            talk_seconds: self.talk_ms as f64 / 1000.0,
            wrap_up_seconds: wrap as f64 / 1000.0,
            ready_seconds: ready as f64 / 1000.0,
            not_ready_seconds: not_ready,
            logged_in_seconds: logged_in as f64 / 1000.0,
            occupancy: (denominator > 0).then(|| busy as f64 / denominator as f64),
        }
    }
}

/// The agents report over `range`.
pub async fn agents(pool: &AnyPool, range: &Range) -> Result<AgentsReport, HistoryError> {
    let step = range.interval.millis();
    let mut sums: BTreeMap<(i64, String), AgentSums> = BTreeMap::new();
    let filter = if range.queue.is_some() {
        " AND queue = ?4"
    } else {
        ""
    };
    let sql = format!(
        "SELECT (started_ms - ?1) / ?2 AS b, agent, count(*), CAST(coalesce(sum(talk_ms), 0) AS BIGINT)
         FROM call_history
         WHERE started_ms >= ?1 AND started_ms < ?3 AND agent IS NOT NULL{filter}
         GROUP BY b, agent"
    );
    let sql = db::sql(pool, &sql);
    let mut q = sqlx::query_as::<_, (i64, String, i64, i64)>(&sql)
        .bind(range.from_ms)
        .bind(step)
        .bind(range.to_ms);
    if let Some(queue) = &range.queue {
        q = q.bind(queue.clone());
    }
    for (b, agent, n, talk) in q.fetch_all(pool).await? {
        let s = sums.entry((b, agent)).or_default();
        s.calls = n.max(0) as u64;
        s.talk_ms = talk;
    }
    // State spans overlapping the range, cut at the edges of each interval.
    let spans: Vec<(String, String, Option<String>, i64, i64)> = sqlx::query_as(&db::sql(
        pool,
        "SELECT agent, state, reason, started_ms, ended_ms FROM agent_states
         WHERE started_ms < ?2 AND ended_ms > ?1",
    ))
    .bind(range.from_ms)
    .bind(range.to_ms)
    .fetch_all(pool)
    .await?;
    for (agent, state, reason, start, end) in spans {
        let key = match (state.as_str(), reason) {
            ("paused", Some(r)) => format!("paused:{r}"),
            ("paused", None) => "paused:".to_owned(),
            (s, _) => s.to_owned(),
        };
        let (mut a, end) = (start.max(range.from_ms), end.min(range.to_ms));
        while a < end {
            let b = (a - range.from_ms) / step;
            let bucket_end = range.from_ms + (b + 1) * step;
            let piece = end.min(bucket_end) - a;
            let s = sums.entry((b, agent.clone())).or_default();
            *s.states.entry(key.clone()).or_default() += piece;
            a = bucket_end;
        }
    }
    let mut totals: BTreeMap<String, AgentSums> = BTreeMap::new();
    let mut rows = Vec::with_capacity(sums.len());
    for ((b, agent), s) in &sums {
        totals.entry(agent.clone()).or_default().add(s);
        rows.push(s.row(iso(range.from_ms + b * step), agent));
    }
    Ok(AgentsReport {
        from: iso(range.from_ms),
        to: iso(range.to_ms),
        interval: range.interval,
        queue: range.queue.clone(),
        rows,
        totals: totals
            .iter()
            .map(|(a, s)| s.row("total".into(), a))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::writer::write;
    use super::super::{AbandonedIn, AgentStateRecord, CallRecord, Outcome, QueueVisit, Record};
    use super::*;
    use crate::dispatch::tickets::TicketStore;

    /// 2027-01-03T00:00:00Z.
    const T0: i64 = 1_798_934_400_000;
    const MIN: i64 = 60_000;

    fn call(id: &str, at: i64, outcome: Outcome, queue: Option<QueueVisit>) -> Record {
        Record::Call(Box::new(CallRecord {
            call_id: id.into(),
            started_ms: at,
            answered_ms: (!matches!(outcome, Outcome::Rejected { .. })).then_some(at + 500),
            ended_ms: at + 5 * MIN,
            caller: "+15551230000".into(),
            caller_verified: false,
            dialled: "311".into(),
            language: Some("en".into()),
            menu_path: None,
            outcome,
            end_reason: None,
            queue,
        }))
    }

    fn visit(queue: &str, wait_s: i64, agent: Option<&str>, talk_s: i64) -> Option<QueueVisit> {
        Some(QueueVisit {
            queue: queue.into(),
            entered_ms: 0,
            wait_ms: wait_s * 1000,
            agent: agent.map(Into::into),
            talk_ms: agent.map(|_| talk_s * 1000),
        })
    }

    fn abandoned(after_s: i64) -> Outcome {
        Outcome::Abandoned {
            at: AbandonedIn::Queue,
            after_ms: after_s * 1000,
        }
    }

    /// A small hand-made hour (10:00 to 11:00) and one call at 11:10:
    /// - queue `general` (target 30 s): answered after 10 s (talk 100 s), 30 s (talk 200 s)
    ///   and 50 s (talk 300 s); abandoned after 3 s (short) and after 40 s; a call-back
    ///   requested after 20 s (answered later);
    /// - queue `spanish` (target 60 s): answered after 45 s (talk 60 s);
    /// - IVR: two tickets (potholes, graffiti), one info, one 911, one abandoned in the
    ///   menu, one refused (503);
    /// - 11:10: a ticket (potholes).
    async fn hand_made() -> (TicketStore, ReportsConfig) {
        let store = TicketStore::open_in_memory().await.unwrap();
        let h = T0 + 10 * 60 * MIN;
        let records = vec![
            call(
                "a1",
                h,
                Outcome::Bridged,
                visit("general", 10, Some("1001"), 100),
            ),
            call(
                "a2",
                h + MIN,
                Outcome::Bridged,
                visit("general", 30, Some("1002"), 200),
            ),
            call(
                "a3",
                h + 20 * MIN,
                Outcome::Bridged,
                visit("general", 50, Some("1001"), 300),
            ),
            call(
                "s1",
                h + 2 * MIN,
                abandoned(3),
                visit("general", 3, None, 0),
            ),
            call(
                "l1",
                h + 3 * MIN,
                abandoned(40),
                visit("general", 40, None, 0),
            ),
            call(
                "c1",
                h + 4 * MIN,
                Outcome::Callback,
                visit("general", 20, None, 0),
            ),
            call(
                "e1",
                h + 5 * MIN,
                Outcome::Bridged,
                visit("spanish", 45, Some("1003"), 60),
            ),
            call(
                "t1",
                h + 6 * MIN,
                Outcome::Ticket {
                    id: Some(12345678),
                    service: "potholes".into(),
                },
                None,
            ),
            call(
                "t2",
                h + 7 * MIN,
                Outcome::Ticket {
                    id: Some(12345679),
                    service: "graffiti".into(),
                },
                None,
            ),
            call("i1", h + 8 * MIN, Outcome::Info, None),
            call(
                "x1",
                h + 9 * MIN,
                Outcome::Emergency { audit_id: Some(1) },
                None,
            ),
            call(
                "m1",
                h + 10 * MIN,
                Outcome::Abandoned {
                    at: AbandonedIn::Menu,
                    after_ms: 9000,
                },
                None,
            ),
            call(
                "r1",
                h + 11 * MIN,
                Outcome::Rejected {
                    code: 503,
                    why: "limit".into(),
                },
                None,
            ),
            call(
                "t3",
                h + 70 * MIN,
                Outcome::Ticket {
                    id: Some(12345680),
                    service: "potholes".into(),
                },
                None,
            ),
            Record::CallbackResult {
                call_id: "c1".into(),
                attempts: 1,
                result: "served",
            },
            // Operator 1001's wrap-ups after its two calls: 10 s and 20 s.
            Record::AgentState(AgentStateRecord {
                agent: "1001".into(),
                state: "wrap_up",
                reason: None,
                started_ms: h + 5 * MIN,
                ended_ms: h + 5 * MIN + 10_000,
            }),
            Record::AgentState(AgentStateRecord {
                agent: "1001".into(),
                state: "wrap_up",
                reason: None,
                started_ms: h + 25 * MIN,
                ended_ms: h + 25 * MIN + 20_000,
            }),
        ];
        let mut config = ReportsConfig::default();
        config
            .queue_service_level_seconds
            .insert("spanish".into(), 60);
        // As the writer does: the rollup built at start (here, empty), then kept as it writes.
        super::super::rollup::rebuild_if_changed(store.pool(), &config)
            .await
            .unwrap();
        write(store.pool(), &config, &Default::default(), &records)
            .await
            .unwrap();
        (store, config)
    }

    /// The same range a millisecond wider at each end: read from `call_history` itself,
    /// not the rollup (nothing happened in those milliseconds).
    fn unaligned(r: Range) -> Range {
        Range {
            from_ms: r.from_ms - 1,
            to_ms: r.to_ms + 1,
            ..r
        }
    }

    fn hour_range(queue: Option<&str>) -> Range {
        Range {
            from_ms: T0 + 10 * 60 * MIN,
            to_ms: T0 + 12 * 60 * MIN,
            interval: Interval::Hour,
            queue: queue.map(Into::into),
        }
    }

    async fn ten_oclock(queue: Option<&str>) -> CallsRow {
        let (store, config) = hand_made().await;
        let r = calls(store.pool(), &config, &hour_range(queue))
            .await
            .unwrap();
        assert!(super::super::rollup::ready(store.pool(), &config)
            .await
            .unwrap());
        let raw = calls(store.pool(), &config, &unaligned(hour_range(queue)))
            .await
            .unwrap();
        assert_eq!(raw.rows.len(), r.rows.len());
        for (a, b) in r.rows.iter().zip(&raw.rows) {
            let b = CallsRow {
                interval_start: a.interval_start.clone(),
                ..b.clone()
            };
            assert_eq!(*a, b, "the rollup and the rows agree");
        }
        // 10:00, and 11:00 (its ticket) unless one queue is asked for.
        assert_eq!(r.rows.len(), if queue.is_some() { 1 } else { 2 });
        assert_eq!(r.rows[0].interval_start, "2027-01-03T10:00:00Z");
        r.rows[0].clone()
    }

    #[tokio::test]
    async fn offered_counts_calls_that_entered_a_queue() {
        let r = ten_oclock(None).await;
        assert_eq!(r.calls, 13);
        assert_eq!(r.rejected, 1);
        assert_eq!(r.answered_by_ivr, 12);
        assert_eq!(r.offered, 7);
        assert_eq!(ten_oclock(Some("spanish")).await.offered, 1);
    }

    #[tokio::test]
    async fn answered_counts_offered_calls_an_operator_took() {
        assert_eq!(ten_oclock(None).await.answered, 4);
        assert_eq!(ten_oclock(Some("general")).await.answered, 3);
    }

    #[tokio::test]
    async fn abandoned_is_offered_less_answered_less_callbacks_and_short_ones_apart() {
        let r = ten_oclock(None).await;
        assert_eq!(r.abandoned, 2);
        assert_eq!(r.short_abandoned, 1);
        assert_eq!(r.callbacks_requested, 1);
    }

    #[tokio::test]
    async fn service_level_uses_each_queues_target_and_leaves_out_short_abandons() {
        let r = ten_oclock(None).await;
        // general: 10 s and 30 s within 30 s (50 s not); spanish: 45 s within 60 s.
        assert_eq!(r.answered_within_target, 3);
        // 3 ÷ (7 offered − 1 short abandon).
        assert_eq!(r.service_level, Some(3.0 / 6.0));
        let g = ten_oclock(Some("general")).await;
        assert_eq!(g.service_level, Some(2.0 / 5.0));
    }

    #[tokio::test]
    async fn service_level_with_one_target_for_every_queue() {
        let (store, _) = hand_made().await;
        let config = ReportsConfig::default();
        // The writer rebuilds the rollup when the thresholds change.
        assert!(
            super::super::rollup::rebuild_if_changed(store.pool(), &config)
                .await
                .unwrap()
        );
        for r in [
            calls(store.pool(), &config, &hour_range(None))
                .await
                .unwrap(),
            calls(store.pool(), &config, &unaligned(hour_range(None)))
                .await
                .unwrap(),
        ] {
            // 10 s and 30 s within 30 s; 50 s and 45 s not.
            assert_eq!(r.rows[0].answered_within_target, 2);
            assert_eq!(r.rows[0].service_level, Some(2.0 / 6.0));
        }
    }

    #[tokio::test]
    async fn speed_of_answer_averages_the_waits_of_answered_calls() {
        assert_eq!(
            ten_oclock(None).await.asa_seconds,
            Some((10.0 + 30.0 + 50.0 + 45.0) / 4.0)
        );
    }

    #[tokio::test]
    async fn handle_time_averages_talk_plus_wrap_up() {
        // 100+10, 200, 300+20, 60.
        assert_eq!(
            ten_oclock(None).await.aht_seconds,
            Some((110.0 + 200.0 + 320.0 + 60.0) / 4.0)
        );
    }

    #[tokio::test]
    async fn longest_wait_is_the_longest_of_any_offered_call() {
        assert_eq!(ten_oclock(None).await.longest_wait_seconds, 50.0);
        assert_eq!(ten_oclock(Some("spanish")).await.longest_wait_seconds, 45.0);
    }

    #[tokio::test]
    async fn callbacks_completed_counts_answered_call_backs() {
        let r = ten_oclock(None).await;
        assert_eq!((r.callbacks_requested, r.callbacks_completed), (1, 1));
    }

    #[tokio::test]
    async fn emergency_redirects_and_tickets_by_service() {
        let r = ten_oclock(None).await;
        assert_eq!(r.emergency_redirects, 1);
        assert_eq!(r.tickets, 2);
        assert_eq!(
            r.tickets_by_service,
            BTreeMap::from([("graffiti".into(), 1), ("potholes".into(), 1)])
        );
    }

    #[tokio::test]
    async fn self_service_is_tickets_and_information_without_an_operator() {
        let r = ten_oclock(None).await;
        assert_eq!(r.self_service, 3);
        assert_eq!(r.self_service_rate, Some(3.0 / 12.0));
    }

    #[tokio::test]
    async fn the_total_adds_the_intervals_and_a_day_agrees_with_its_hours() {
        let (store, config) = hand_made().await;
        let hours = calls(store.pool(), &config, &hour_range(None))
            .await
            .unwrap();
        let day = calls(
            store.pool(),
            &config,
            &Range {
                interval: Interval::Day,
                from_ms: T0,
                to_ms: T0 + 86_400_000,
                queue: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(hours.total.calls, 14);
        assert_eq!(hours.total.tickets_by_service.get("potholes"), Some(&2));
        let mut d = day.total.clone();
        d.interval_start = "total".into();
        assert_eq!(day.rows.len(), 1);
        assert_eq!(hours.total, d);
    }

    /// A year of a busy city's history (10,000 calls a day, 3.65 million rows, generated in
    /// SQL) and the year's report by day. `cargo test --lib year_of_history -- --ignored
    /// --nocapture`; the timing is in BENCHMARKS.md.
    #[tokio::test]
    #[ignore = "builds a 3.65-million-row database (about a minute); a measurement"]
    async fn year_of_history_reports_in_under_a_second() {
        let path = std::env::temp_dir().join(format!("ivr311-year-{}.db", rand::random::<u64>()));
        let store = TicketStore::open(&path).await.unwrap();
        let pool = store.pool();
        let per_day: i64 = 10_000;
        let days: i64 = 365;
        let t = std::time::Instant::now();
        // Outcomes by a hash of the row number: 30 % reach the queue (85 % of those
        // answered), 45 % tickets, 10 % information, 1 % 911, the rest abandoned in the menu.
        sqlx::query(&db::sql(
            pool,
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?1 - 1),
             r AS (SELECT i, (i * 2654435761) % 1000 AS h FROM n)
             INSERT INTO call_history (call_id, started_ms, answered_ms, ended_ms, caller,
                 dialled, language, menu_path, outcome, ticket_id, ticket_service, queue,
                 queue_entered_ms, wait_ms, agent, talk_ms, wrap_up_ms, abandoned_in,
                 abandoned_after_ms)
             SELECT 'gen-' || i, ?2 + i * (86400000 / ?3), ?2 + i * (86400000 / ?3) + 500,
                 ?2 + i * (86400000 / ?3) + 180000, '+1555' || (1000000 + h * 7919 % 8999999),
                 '311', CASE WHEN h % 5 = 0 THEN 'es' ELSE 'en' END, 'language:1 > main:1',
                 CASE WHEN h < 255 THEN 'bridged' WHEN h < 300 THEN 'abandoned'
                      WHEN h < 750 THEN 'ticket' WHEN h < 850 THEN 'info'
                      WHEN h < 860 THEN 'emergency' ELSE 'abandoned' END,
                 CASE WHEN h >= 300 AND h < 750 THEN 10000000 + i END,
                 CASE WHEN h >= 300 AND h < 750 THEN 'svc' || (h % 12) END,
                 CASE WHEN h < 300 THEN CASE WHEN h % 3 = 0 THEN 'spanish' ELSE 'general' END END,
                 CASE WHEN h < 300 THEN ?2 + i * (86400000 / ?3) + 20000 END,
                 CASE WHEN h < 300 THEN (h * 37) % 120000 END,
                 CASE WHEN h < 255 THEN '10' || (h % 40) END,
                 CASE WHEN h < 255 THEN 60000 + (h * 911) % 400000 END,
                 CASE WHEN h < 255 THEN 10000 END,
                 CASE WHEN h >= 255 AND h < 300 THEN 'queue'
                      WHEN h >= 860 THEN 'menu' END,
                 CASE WHEN h >= 255 AND h < 300 THEN (h * 37) % 120000
                      WHEN h >= 860 THEN 30000 END
             FROM r",
        ))
        .bind(per_day * days)
        .bind(T0 - days * 86_400_000)
        .bind(per_day)
        .execute(pool)
        .await
        .unwrap();
        let n: i64 = sqlx::query_scalar(&db::sql(pool, "SELECT count(*) FROM call_history"))
            .fetch_one(pool)
            .await
            .unwrap();
        eprintln!("generated {n} rows in {:?}", t.elapsed());
        // Rows made in SQL bypass the writer: build the rollup as a start would.
        let t = std::time::Instant::now();
        assert!(
            super::super::rollup::rebuild_if_changed(pool, &ReportsConfig::default())
                .await
                .unwrap()
        );
        eprintln!("rollup rebuilt in {:?}", t.elapsed());
        let range = Range {
            from_ms: T0 - days * 86_400_000,
            to_ms: T0,
            interval: Interval::Day,
            queue: None,
        };
        let config = ReportsConfig::default();
        let mut best = std::time::Duration::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let r = calls(pool, &config, &range).await.unwrap();
            best = best.min(t.elapsed());
            assert_eq!(r.rows.len(), days as usize);
            assert_eq!(r.total.calls, n as u64);
        }
        let t = std::time::Instant::now();
        let q = calls(
            pool,
            &config,
            &Range {
                queue: Some("general".into()),
                ..range.clone()
            },
        )
        .await
        .unwrap();
        let one_queue = t.elapsed();
        let t = std::time::Instant::now();
        let hours = calls(
            pool,
            &config,
            &Range {
                interval: Interval::Hour,
                ..range.clone()
            },
        )
        .await
        .unwrap();
        let by_hour = t.elapsed();
        let t = std::time::Instant::now();
        let raw = calls(pool, &config, &unaligned(range.clone()))
            .await
            .unwrap();
        let from_rows = t.elapsed();
        assert_eq!(raw.total.calls, n as u64);
        eprintln!(
            "year by day: {best:?} (best of 3); one queue: {one_queue:?}; by hour ({} rows): \
             {by_hour:?}; from the rows themselves: {from_rows:?}",
            hours.rows.len()
        );
        assert!(q.total.offered > 0);
        store.close().await;
        let _ = std::fs::remove_file(&path);
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
        }
        assert!(best < std::time::Duration::from_secs(1), "{best:?}");
    }

    #[tokio::test]
    async fn agent_figures_from_calls_and_state_spans() {
        let (store, _) = hand_made().await;
        let t = T0 + 10 * 60 * MIN;
        let spans = [
            ("available", None, 0, 30 * MIN),
            ("on_call", None, 30 * MIN, 40 * MIN),
            ("wrap_up", None, 40 * MIN, 45 * MIN),
            ("paused", Some("lunch"), 45 * MIN, 75 * MIN),
            ("logged_out", None, 75 * MIN, 90 * MIN),
        ];
        let records: Vec<Record> = spans
            .iter()
            .map(|(state, reason, a, b)| {
                Record::AgentState(AgentStateRecord {
                    agent: "2001".into(),
                    state,
                    reason: reason.map(Into::into),
                    started_ms: t + a,
                    ended_ms: t + b,
                })
            })
            .collect();
        write(
            store.pool(),
            &ReportsConfig::default(),
            &Default::default(),
            &records,
        )
        .await
        .unwrap();
        let r = agents(store.pool(), &hour_range(None)).await.unwrap();
        let ten = r
            .rows
            .iter()
            .find(|r| r.agent == "2001" && r.interval_start.contains("T10"))
            .unwrap();
        assert_eq!(ten.ready_seconds, 1800.0);
        assert_eq!(ten.wrap_up_seconds, 300.0);
        // The lunch break is cut at 11:00.
        assert_eq!(ten.not_ready_seconds.get("lunch"), Some(&900.0));
        assert_eq!(ten.logged_in_seconds, 3600.0);
        // (10 min on call + 5 wrap-up) ÷ (15 + 30 ready).
        assert_eq!(ten.occupancy, Some(15.0 / 45.0));
        let total = r.totals.iter().find(|r| r.agent == "2001").unwrap();
        assert_eq!(total.not_ready_seconds.get("lunch"), Some(&1800.0));
        assert_eq!(total.logged_in_seconds, 75.0 * 60.0);
        // 1001 answered two calls (talk 100 s + 300 s), with 30 s of wrap-up.
        let a = r.totals.iter().find(|r| r.agent == "1001").unwrap();
        assert_eq!(
            (a.calls, a.talk_seconds, a.wrap_up_seconds),
            (2, 400.0, 30.0)
        );
    }
}
