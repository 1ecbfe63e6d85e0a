//! The retention pass: at start and then daily, what `retention:` says has been kept long
//! enough goes, and the admins' log (`ivr311::audit`) says what and how much.
//!
//! [`apply`] is the pass, as of a `now` it is given (tests run it on any date); [`run`] is
//! the task that calls it with the server's wall clock.

use super::{PrivacyError, RetentionConfig, ERASED};
use crate::dispatch::db;
use crate::dispatch::tickets::iso;
use crate::history::HistoryConfig;
use crate::menu::schedule::WallClock;
use serde::Serialize;
use sqlx::AnyPool;
use std::path::{Path, PathBuf};
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Rows changed per statement, so a large pass never holds the write lock long.
const CHUNK: i64 = 2000;
// The number retention's SQL and the partial index tickets_number_requested spell out.
const _: () = assert!(matches!(ERASED.as_bytes(), b"erased"));

/// Removes a chunk of callers' numbers from tickets older than the cutoff (binds ERASED,
/// ERASED, cutoff, CHUNK). `phone <> 'erased'` is written out so that the partial index
/// tickets_number_requested, which holds only numbers not yet removed, serves it: a pass
/// reads the numbers it removes, not every ticket older than the cutoff.
const TICKET_NUMBERS: &str = "UPDATE tickets SET phone = ? WHERE service_request_id IN \
    (SELECT service_request_id FROM tickets WHERE phone IS NOT NULL AND phone <> 'erased' \
    AND phone <> ? AND requested_datetime < ? LIMIT ?)";

/// A chunk of tickets older than the cutoff that still have a recording (binds cutoff,
/// CHUNK); served by the partial index tickets_recording_requested.
const TICKET_RECORDINGS: &str = "SELECT service_request_id, recording FROM tickets \
    WHERE recording IS NOT NULL AND requested_datetime < ? LIMIT ?";

/// What one pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Ticket recordings deleted (files, and the tickets' links to them).
    pub ticket_recordings: u64,
    /// Operator-call recordings deleted.
    pub call_recordings: u64,
    /// Tickets whose caller's number was removed.
    pub ticket_numbers: u64,
    /// Call-back requests whose number was removed.
    pub callback_numbers: u64,
    /// Outbox payloads (webhook bodies) whose caller's number was removed.
    pub outbox_numbers: u64,
    /// Call history rows whose caller (number or its hash) was removed.
    pub history_numbers: u64,
    /// Call history rows deleted (calls, operators' states, queue events).
    pub history_rows: u64,
    /// Call history numbers replaced by their keyed hash.
    pub history_hashed: u64,
}

fn days_before(now: OffsetDateTime, days: u32) -> OffsetDateTime {
    now - time::Duration::days(i64::from(days))
}

fn epoch_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// One pass as of `now`: recordings older than `recordings_days` deleted, numbers older than
/// `caller_numbers_days` removed, history older than `history_days` deleted (and numbers
/// older than `history.hash_numbers_after_days` hashed). A period of 0 keeps that data.
pub async fn apply(
    pool: &AnyPool,
    recordings_dir: &Path,
    config: &RetentionConfig,
    history: &HistoryConfig,
    now: OffsetDateTime,
) -> Result<RetentionReport, PrivacyError> {
    let mut r = RetentionReport::default();
    if config.recordings_days > 0 {
        let cutoff = days_before(now, config.recordings_days);
        r.ticket_recordings = ticket_recordings(pool, recordings_dir, &iso_text(cutoff)).await?;
        let dir = recordings_dir.to_owned();
        let keep = Duration::from_secs(u64::from(config.recordings_days) * 86_400);
        let at = std::time::SystemTime::from(now);
        r.call_recordings =
            tokio::task::spawn_blocking(move || crate::media::call_record::prune(&dir, at, keep))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|source| PrivacyError::Io {
                    path: recordings_dir.join(crate::media::call_record::SUBDIR),
                    source,
                })? as u64;
    }
    if config.caller_numbers_days > 0 {
        let cutoff = days_before(now, config.caller_numbers_days);
        let text = iso_text(cutoff);
        r.ticket_numbers = chunked(pool, TICKET_NUMBERS, &text).await?;
        r.callback_numbers = chunked(
            pool,
            "UPDATE callback_requests SET number = ? WHERE id IN (SELECT id FROM \
             callback_requests WHERE number <> ? AND at < ? LIMIT ?)",
            &text,
        )
        .await?;
        r.outbox_numbers = outbox_numbers(pool, epoch_ms(cutoff)).await?;
        r.history_numbers = history_numbers(pool, epoch_ms(cutoff)).await?;
    }
    let (deleted, hashed) =
        crate::history::prune(pool, history, config.history_days, epoch_ms(now)).await?;
    r.history_rows = deleted;
    r.history_hashed = hashed;
    Ok(r)
}

fn iso_text(t: OffsetDateTime) -> String {
    // Whole seconds in UTC always format.
    iso(crate::dispatch::tickets::whole_second_utc(t)).unwrap_or_default()
}

/// Runs `sql` (binding ERASED, ERASED, `cutoff`, CHUNK) until it changes fewer than CHUNK rows.
async fn chunked(pool: &AnyPool, sql: &str, cutoff: &str) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(&db::sql(pool, sql))
            .bind(ERASED)
            .bind(ERASED)
            .bind(cutoff)
            .bind(CHUNK)
            .execute(pool)
            .await?
            .rows_affected();
        total += n;
        if n < CHUNK as u64 {
            return Ok(total);
        }
    }
}

async fn ticket_recordings(pool: &AnyPool, dir: &Path, cutoff: &str) -> Result<u64, PrivacyError> {
    let mut total = 0;
    loop {
        let rows: Vec<(i64, String)> = sqlx::query_as(&db::sql(pool, TICKET_RECORDINGS))
            .bind(cutoff)
            .bind(CHUNK)
            .fetch_all(pool)
            .await?;
        if rows.is_empty() {
            return Ok(total);
        }
        for (id, name) in &rows {
            if let Some(path) = crate::media::record::recording_path(dir, name) {
                remove_file(&path)?;
            }
            sqlx::query(&db::sql(
                pool,
                "UPDATE tickets SET recording = NULL WHERE service_request_id = ?",
            ))
            .bind(id)
            .execute(pool)
            .await?;
            total += 1;
        }
    }
}

/// Deletes `path`; one already gone counts as deleted.
pub(crate) fn remove_file(path: &Path) -> Result<(), PrivacyError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PrivacyError::Io {
            path: PathBuf::from(path),
            source,
        }),
    }
}

/// Replaces, anywhere in `v`, the string values that `hit(key, value)` picks with [`ERASED`].
/// Returns whether anything changed.
pub(crate) fn scrub_json(v: &mut serde_json::Value, hit: &dyn Fn(&str, &str) -> bool) -> bool {
    fn walk(key: &str, v: &mut serde_json::Value, hit: &dyn Fn(&str, &str) -> bool) -> bool {
        match v {
            serde_json::Value::String(s) if s != ERASED && hit(key, s) => {
                *s = ERASED.to_owned();
                true
            }
            serde_json::Value::Array(a) => {
                let mut any = false;
                for x in a {
                    any |= walk(key, x, hit);
                }
                any
            }
            serde_json::Value::Object(m) => {
                let mut any = false;
                for (k, x) in m.iter_mut() {
                    any |= walk(k, x, hit);
                }
                any
            }
            _ => false,
        }
    }
    walk("", v, hit)
}

/// Webhook bodies written before `cutoff_ms` lose the `phone` field's value.
async fn outbox_numbers(pool: &AnyPool, cutoff_ms: i64) -> Result<u64, sqlx::Error> {
    let mut after = 0i64;
    let mut total = 0;
    loop {
        let rows: Vec<(i64, String)> = sqlx::query_as(&db::sql(
            pool,
            "SELECT id, body FROM outbox WHERE id > ? AND created_ms < ? AND body IS NOT NULL \
             ORDER BY id LIMIT ?",
        ))
        .bind(after)
        .bind(cutoff_ms)
        .bind(CHUNK)
        .fetch_all(pool)
        .await?;
        let Some((last, _)) = rows.last() else {
            return Ok(total);
        };
        after = *last;
        for (id, body) in &rows {
            let Ok(mut v) = serde_json::from_str::<serde_json::Value>(body) else {
                continue;
            };
            if scrub_json(&mut v, &|key, _| key == "phone") {
                sqlx::query(&db::sql(pool, "UPDATE outbox SET body = ? WHERE id = ?"))
                    .bind(v.to_string())
                    .bind(id)
                    .execute(pool)
                    .await?;
                total += 1;
            }
        }
    }
}

/// Call history rows from before `cutoff_ms` lose their caller (number or hash).
async fn history_numbers(pool: &AnyPool, cutoff_ms: i64) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(&db::sql(
            pool,
            "UPDATE call_history SET caller = ?, number_hashed = 1 WHERE id IN (SELECT id FROM \
             call_history WHERE caller IS NOT NULL AND caller <> ? AND started_ms < ? LIMIT ?)",
        ))
        .bind(ERASED)
        .bind(ERASED)
        .bind(cutoff_ms)
        .bind(CHUNK)
        .execute(pool)
        .await?
        .rows_affected();
        total += n;
        if n < CHUNK as u64 {
            return Ok(total);
        }
    }
}

/// Apply retention at start and daily until `cancel`, each pass audited in the log. `clock`
/// gives the date (the system's, or a test's).
pub(crate) async fn run(
    pool: AnyPool,
    recordings_dir: PathBuf,
    (config, history): (RetentionConfig, HistoryConfig),
    clock: WallClock,
    cancel: CancellationToken,
) {
    let mut daily = tokio::time::interval(Duration::from_secs(86_400));
    daily.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = daily.tick() => {}
        }
        let now = OffsetDateTime::from_unix_timestamp_nanos(clock.now().as_nanosecond())
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        match apply(&pool, &recordings_dir, &config, &history, now).await {
            Ok(r) => info!(
                target: "ivr311::audit",
                ticket_recordings_deleted = r.ticket_recordings,
                call_recordings_deleted = r.call_recordings,
                ticket_numbers_removed = r.ticket_numbers,
                callback_numbers_removed = r.callback_numbers,
                outbox_numbers_removed = r.outbox_numbers,
                history_numbers_removed = r.history_numbers,
                history_rows_deleted = r.history_rows,
                history_numbers_hashed = r.history_hashed,
                recordings_days = config.recordings_days,
                caller_numbers_days = config.caller_numbers_days,
                history_days = config.history_days,
                "retention applied"
            ),
            Err(e) => warn!(error = %e, "retention pass failed; retried tomorrow"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dispatch::tickets::{Channel, NewTicket, TicketStore};

    /// The pass reads only the rows it still has work on, however many years the store
    /// holds: each of its ticket queries is served by its partial index.
    #[tokio::test]
    async fn the_ticket_queries_use_their_partial_indexes() {
        let store = TicketStore::open_in_memory().await.unwrap();
        if store.dialect() != crate::dispatch::db::Dialect::Sqlite {
            return; // SQLite's plans; the PostgreSQL twin has the same indexes (tests/postgres.rs)
        }
        for (sql, index) in [
            (TICKET_NUMBERS, "tickets_number_requested"),
            (TICKET_RECORDINGS, "tickets_recording_requested"),
        ] {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .fetch_all(store.pool())
                    .await
                    .unwrap();
            let plan: Vec<String> = plan.into_iter().map(|r| r.3).collect();
            assert!(plan.iter().any(|s| s.contains(index)), "{sql}\n{plan:?}");
        }
    }

    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ivr311-{tag}-{}", rand::random::<u64>()));
        std::fs::create_dir_all(dir.join(crate::media::call_record::SUBDIR)).unwrap();
        dir
    }

    pub(crate) async fn phone_ticket(
        store: &TicketStore,
        phone: &str,
        recording: Option<&str>,
        call_id: &str,
        filed: &str,
    ) -> i64 {
        let t = store
            .file(NewTicket {
                service_code: "pothole".into(),
                service_name: "Pothole".into(),
                phone: Some(phone.into()),
                recording: recording.map(Into::into),
                channel: Channel::Phone,
                call_id: Some(call_id.into()),
                zipcode: Some("10001".into()),
                ..NewTicket::default()
            })
            .await
            .unwrap();
        sqlx::query(&db::sql(
            store.pool(),
            "UPDATE tickets SET requested_datetime = ? WHERE service_request_id = ?",
        ))
        .bind(filed)
        .bind(t.service_request_id as i64)
        .execute(store.pool())
        .await
        .unwrap();
        t.service_request_id as i64
    }

    #[tokio::test]
    async fn a_pass_removes_only_what_is_past_its_days() {
        let store = TicketStore::open_in_memory().await.unwrap();
        let pool = store.pool();
        let dir = temp_dir("retention");
        let now = time::macros::datetime!(2026-12-07 12:00 UTC);
        for f in ["old.wav", "new.wav"] {
            std::fs::write(dir.join(f), b"RIFF").unwrap();
        }
        // 100 days old: past the recordings' 90, not the numbers' 400.
        let mid = phone_ticket(
            &store,
            "+12125550100",
            Some("old.wav"),
            "a@x",
            "2026-08-29T12:00:00Z",
        )
        .await;
        // 500 days old: past both.
        let old = phone_ticket(&store, "+12125550101", None, "b@x", "2025-07-25T12:00:00Z").await;
        let new = phone_ticket(
            &store,
            "+12125550102",
            Some("new.wav"),
            "c@x",
            "2026-12-01T12:00:00Z",
        )
        .await;
        let day_ms = 86_400_000;
        let now_ms = epoch_ms(now);
        sqlx::query(&db::sql(
            pool,
            "INSERT INTO outbox (kind, target, event, body, state, created_ms, next_ms) VALUES \
             ('webhook', 'http://h', 'request.created', ?, 'done', ?, 0), \
             ('webhook', 'http://h', 'request.created', ?, 'done', ?, 0)",
        ))
        .bind(r#"{"request":{"phone":"+12125550101","service_code":"pothole"}}"#)
        .bind(now_ms - 500 * day_ms)
        .bind(r#"{"request":{"phone":"+12125550102"}}"#)
        .bind(now_ms - day_ms)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(&db::sql(
            pool,
            "INSERT INTO call_history (call_id, started_ms, ended_ms, caller, outcome) VALUES \
             ('b@x', ?, ?, '+12125550101', 'info'), ('c@x', ?, ?, '+12125550102', 'info')",
        ))
        .bind(now_ms - 401 * day_ms)
        .bind(now_ms - 401 * day_ms)
        .bind(now_ms - day_ms)
        .bind(now_ms - day_ms)
        .execute(pool)
        .await
        .unwrap();
        let config = RetentionConfig {
            history_days: 0,
            ..RetentionConfig::default()
        };
        let r = apply(pool, &dir, &config, &HistoryConfig::default(), now)
            .await
            .unwrap();
        assert_eq!(
            r,
            RetentionReport {
                ticket_recordings: 1,
                ticket_numbers: 1,
                outbox_numbers: 1,
                history_numbers: 1,
                ..RetentionReport::default()
            }
        );
        assert!(!dir.join("old.wav").exists());
        assert!(dir.join("new.wav").exists());
        let phones: Vec<(i64, Option<String>, Option<String>)> = sqlx::query_as(&db::sql(
            pool,
            "SELECT service_request_id, phone, recording FROM tickets",
        ))
        .fetch_all(pool)
        .await
        .unwrap();
        for (id, phone, recording) in phones {
            let want = if id == old {
                (Some(ERASED.to_owned()), None)
            } else if id == mid {
                (Some("+12125550100".to_owned()), None)
            } else {
                assert_eq!(id, new);
                (Some("+12125550102".to_owned()), Some("new.wav".to_owned()))
            };
            assert_eq!((phone, recording), want, "ticket {id}");
        }
        let bodies: Vec<String> =
            sqlx::query_scalar(&db::sql(pool, "SELECT body FROM outbox ORDER BY id"))
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(
            bodies[0],
            r#"{"request":{"phone":"erased","service_code":"pothole"}}"#
        );
        assert!(bodies[1].contains("+12125550102"));
        let callers: Vec<String> = sqlx::query_scalar(&db::sql(
            pool,
            "SELECT caller FROM call_history ORDER BY started_ms",
        ))
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(callers, [ERASED, "+12125550102"]);
        // A second pass finds nothing more.
        let again = apply(pool, &dir, &config, &HistoryConfig::default(), now)
            .await
            .unwrap();
        assert_eq!(again, RetentionReport::default());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
