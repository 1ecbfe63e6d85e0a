//! The calls report's sums per 15 minutes (UTC) and queue, kept by the writer as it writes
//! `call_history` (`call_rollup`, `call_rollup_services`), so a report over a year reads
//! tens of thousands of rows instead of millions (BENCHMARKS.md).
//!
//! Derived data, never the record: the same [`report::sums_columns`] over the same rows.
//! The short-abandon limit and the service-level targets are part of the sums, so when they
//! change in the config the writer rebuilds the rollup from `call_history` at start
//! ([`rebuild_if_changed`]). A range that does not start and end on 15-minute boundaries
//! is computed from `call_history` itself.

use super::report::{self, CallSums, Range, ReportsConfig, SumsRow};
use super::HistoryError;
use crate::dispatch::db;
use sqlx::{Any, AnyPool, Transaction};
use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

/// The rollup's granularity.
pub const BUCKET_MS: i64 = 900_000;

const SUMS: [&str; 17] = [
    "calls",
    "answered_by_ivr",
    "rejected",
    "offered",
    "answered",
    "callbacks_requested",
    "unanswered",
    "short_abandoned",
    "answered_within_target",
    "answered_wait_ms",
    "handle_ms",
    "longest_wait_ms",
    "callbacks_completed",
    "callbacks_unreached",
    "emergency_redirects",
    "tickets",
    "self_service",
];

/// Whether the rollup can answer for `range` (its edges on 15-minute boundaries; every
/// interval is a whole number of buckets).
pub fn serves(range: &Range) -> bool {
    range.from_ms.rem_euclid(BUCKET_MS) == 0 && range.to_ms.rem_euclid(BUCKET_MS) == 0
}

/// The thresholds as SQL literals (numbers, and queue names quoted).
fn thresholds(config: &ReportsConfig) -> (String, String) {
    let short = (config.short_abandon_seconds.saturating_mul(1000)).to_string();
    let default = config.service_level_seconds.saturating_mul(1000);
    if config.queue_service_level_seconds.is_empty() {
        return (short, default.to_string());
    }
    let mut target = String::from("CASE queue");
    for (queue, secs) in &config.queue_service_level_seconds {
        target.push_str(&format!(
            " WHEN '{}' THEN {}",
            queue.replace('\'', "''"),
            secs.saturating_mul(1000)
        ));
    }
    target.push_str(&format!(" ELSE {default} END"));
    (short, target)
}

/// What the rollup was computed with, as kept in `history_meta`.
fn fingerprint(config: &ReportsConfig) -> String {
    let (short, target) = thresholds(config);
    format!("v1 short={short} target={target}")
}

/// Add the calls with ids `first..=last` (just written) to the rollup.
pub(crate) async fn add_calls(
    tx: &mut Transaction<'_, Any>,
    config: &ReportsConfig,
    ids: (i64, i64),
) -> Result<(), sqlx::Error> {
    add_where(tx, config, "id", ids).await
}

/// Add the calls whose `column` is in `first..=last`.
async fn add_where(
    tx: &mut Transaction<'_, Any>,
    config: &ReportsConfig,
    column: &'static str,
    (first, last): (i64, i64),
) -> Result<(), sqlx::Error> {
    let (short, target) = thresholds(config);
    let updates: Vec<String> = SUMS
        .iter()
        .map(|c| match *c {
            "longest_wait_ms" => format!(
                "{c} = {greatest}(call_rollup.{c}, excluded.{c})",
                greatest = db::greatest(&**tx)
            ),
            _ => format!("{c} = call_rollup.{c} + excluded.{c}"),
        })
        .collect();
    let sql = format!(
        "INSERT INTO call_rollup (bucket_ms, queue, {names})
         SELECT started_ms - started_ms % {BUCKET_MS}, coalesce(queue, ''), {columns}
         FROM call_history WHERE {column} BETWEEN ?1 AND ?2
         GROUP BY 1, 2
         ON CONFLICT (bucket_ms, queue) DO UPDATE SET {updates}",
        names = SUMS.join(", "),
        columns = report::sums_columns(&short, &target),
        updates = updates.join(", "),
    );
    sqlx::query(&db::sql(&**tx, &sql))
        .bind(first)
        .bind(last)
        .execute(&mut **tx)
        .await?;
    sqlx::query(&db::sql(
        &**tx,
        &format!(
        "INSERT INTO call_rollup_services (bucket_ms, queue, service, tickets)
         SELECT started_ms - started_ms % {BUCKET_MS}, coalesce(queue, ''),
                coalesce(ticket_service, ''), count(*)
         FROM call_history WHERE {column} BETWEEN ?1 AND ?2 AND outcome = 'ticket'
         GROUP BY 1, 2, 3
         ON CONFLICT (bucket_ms, queue, service) DO UPDATE SET tickets = call_rollup_services.tickets + excluded.tickets"
    ),
    ))
    .bind(first)
    .bind(last)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Call `id` got its wrap-up (`wrap_up_ms`): its handle time grows by that much.
pub(crate) async fn add_wrap_up(
    tx: &mut Transaction<'_, Any>,
    id: i64,
    wrap_up_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(&db::sql(
        &**tx,
        &format!(
            "UPDATE call_rollup SET handle_ms = handle_ms + ?1
         WHERE (bucket_ms, queue) = (SELECT started_ms - started_ms % {BUCKET_MS},
             coalesce(queue, '') FROM call_history WHERE id = ?2 AND queue IS NOT NULL
             AND agent IS NOT NULL)"
        ),
    ))
    .bind(wrap_up_ms)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Call `id`'s call-back ended with `result`.
pub(crate) async fn add_callback_result(
    tx: &mut Transaction<'_, Any>,
    id: i64,
    result: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&db::sql(
        &**tx,
        &format!(
            "UPDATE call_rollup SET
             callbacks_completed = callbacks_completed + CASE WHEN ?1 = 'served' THEN 1 ELSE 0 END,
             callbacks_unreached = callbacks_unreached + CASE WHEN ?1 = 'unreached' THEN 1 ELSE 0 END
         WHERE (bucket_ms, queue) = (SELECT started_ms - started_ms % {BUCKET_MS},
             coalesce(queue, '') FROM call_history WHERE id = ?2)"
        ),
    ))
    .bind(result)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Drop the buckets wholly before `cutoff_ms` (their rows were pruned).
pub(crate) async fn prune(pool: &AnyPool, cutoff_ms: i64) -> Result<(), sqlx::Error> {
    for table in ["call_rollup", "call_rollup_services"] {
        sqlx::query(&db::sql(
            pool,
            &format!("DELETE FROM {table} WHERE bucket_ms + {BUCKET_MS} <= ?"),
        ))
        .bind(cutoff_ms)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Whether the rollup was computed with `config`'s thresholds (reports read the calls
/// themselves until it is).
pub async fn ready(pool: &AnyPool, config: &ReportsConfig) -> Result<bool, sqlx::Error> {
    let have: Option<String> = sqlx::query_scalar(&db::sql(
        pool,
        "SELECT value FROM history_meta WHERE key = 'rollup_thresholds'",
    ))
    .fetch_optional(pool)
    .await?;
    Ok(have.as_deref() == Some(fingerprint(config).as_str()))
}

/// How much of the history one rebuild transaction covers: the database's write lock (which
/// ticket filing and the 911 audit also take) is held for one day's calls at a time.
const REBUILD_CHUNK_MS: i64 = 86_400_000;

/// Rebuild the rollup from `call_history` if it was computed with other thresholds (or
/// never), a day of calls per transaction. Returns whether it did.
pub async fn rebuild_if_changed(
    pool: &AnyPool,
    config: &ReportsConfig,
) -> Result<bool, HistoryError> {
    if ready(pool, config).await? {
        return Ok(false);
    }
    // Nodes starting at once rebuild one after the other; the later ones find it ready.
    let never = CancellationToken::new();
    let _turn = db::Leader::acquire(pool, db::locks::ROLLUP, &never).await;
    if ready(pool, config).await? {
        return Ok(false);
    }
    let mut tx = pool.begin().await?;
    db::lock_writes(&mut tx).await?;
    sqlx::query(&db::sql(
        &*tx,
        "DELETE FROM history_meta WHERE key = 'rollup_thresholds'",
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&db::sql(&*tx, "DELETE FROM call_rollup"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&db::sql(&*tx, "DELETE FROM call_rollup_services"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let (first, last): (Option<i64>, Option<i64>) = sqlx::query_as(&db::sql(
        pool,
        "SELECT min(started_ms), max(started_ms) FROM call_history",
    ))
    .fetch_one(pool)
    .await?;
    if let (Some(first), Some(last)) = (first, last) {
        // Chunks start on bucket boundaries, so no bucket is split between two.
        let mut at = first - first.rem_euclid(BUCKET_MS);
        while at <= last {
            let mut tx = pool.begin().await?;
            db::lock_writes(&mut tx).await?;
            add_where(
                &mut tx,
                config,
                "started_ms",
                (at, at + REBUILD_CHUNK_MS - 1),
            )
            .await?;
            tx.commit().await?;
            at += REBUILD_CHUNK_MS;
        }
    }
    sqlx::query(&db::sql(
        pool,
        "INSERT INTO history_meta (key, value) VALUES ('rollup_thresholds', ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    ))
    .bind(fingerprint(config))
    .execute(pool)
    .await?;
    Ok(true)
}

/// [`report::call_sums`] from the rollup.
pub async fn call_sums(
    pool: &AnyPool,
    range: &Range,
) -> Result<BTreeMap<i64, CallSums>, HistoryError> {
    let step = range.interval.millis();
    let sums: Vec<String> = SUMS
        .iter()
        .map(|c| match *c {
            "longest_wait_ms" => format!("coalesce(max({c}), 0) AS {c}"),
            _ => format!("CAST(coalesce(sum({c}), 0) AS BIGINT) AS {c}"),
        })
        .collect();
    let filter = if range.queue.is_some() {
        " AND queue = ?4"
    } else {
        ""
    };
    let sql = format!(
        "SELECT (bucket_ms - ?1) / ?2 AS b, {sums} FROM call_rollup
         WHERE bucket_ms >= ?1 AND bucket_ms < ?3{filter}
         GROUP BY b ORDER BY b",
        sums = sums.join(", ")
    );
    let sql = db::sql(pool, &sql);
    let mut q = sqlx::query_as::<_, SumsRow>(&sql)
        .bind(range.from_ms)
        .bind(step)
        .bind(range.to_ms);
    if let Some(queue) = &range.queue {
        q = q.bind(queue.clone());
    }
    let mut out = BTreeMap::new();
    for r in q.fetch_all(pool).await? {
        out.insert(range.from_ms + r.b * step, r.sums());
    }
    let sql = format!(
        "SELECT (bucket_ms - ?1) / ?2 AS b, service, CAST(sum(tickets) AS BIGINT) FROM call_rollup_services
         WHERE bucket_ms >= ?1 AND bucket_ms < ?3{filter}
         GROUP BY b, service"
    );
    let sql = db::sql(pool, &sql);
    let mut q = sqlx::query_as::<_, (i64, String, i64)>(&sql)
        .bind(range.from_ms)
        .bind(step)
        .bind(range.to_ms);
    if let Some(queue) = &range.queue {
        q = q.bind(queue.clone());
    }
    for (b, service, n) in q.fetch_all(pool).await? {
        if let Some(s) = out.get_mut(&(range.from_ms + b * step)) {
            s.tickets_by_service.insert(service, n.max(0) as u64);
        }
    }
    Ok(out)
}
