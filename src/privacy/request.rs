//! A resident's request about their number: [`export`] (every row that holds it, and the
//! recordings linked to it) and [`erase`] (the number removed from every table, the
//! recordings deleted, the erasure recorded and audited).
//!
//! Rows are kept and only the personal fields change, so counts and reports stay as they
//! were. The 911 audit (`emergency_redirects`) is exported but not erased: it is the record
//! that a caller was sent to emergency services, which cities keep under their emergency
//! records retention, and the table refuses changes (see README, "Personal data").

use super::retention::{remove_file, scrub_json};
use super::{Phone, PrivacyError, ERASED};
use crate::dispatch::db::{self, HasDialect};
use crate::dispatch::tickets::{TicketStore, WriteTxn};
use serde::Serialize;
use sqlx::AnyPool;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use time::OffsetDateTime;
use tracing::info;

/// Ticket fields about the person who filed it: cleared on the tickets an erasure finds.
const CONTACT_FIELDS: &[&str] = &["phone", "email", "first_name", "last_name"];

/// Where one number is held.
#[derive(Debug, Default)]
struct Found {
    tickets: Vec<i64>,
    history: Vec<i64>,
    callbacks: Vec<i64>,
    emergency: Vec<i64>,
    outbox: Vec<i64>,
    call_ids: BTreeSet<String>,
    /// Ticket recordings (file names) and operator-call recordings, as paths.
    recordings: BTreeSet<PathBuf>,
    /// Ticket recordings' links, to clear.
    ticket_recordings: Vec<i64>,
}

/// SQL for `column` without the separators numbers are written with, so a prefilter on its
/// last digits finds every form of a number; [`Phone::matches`] then decides.
fn digits(column: &str) -> String {
    format!(
        "replace(replace(replace(replace(replace(replace({column}, '+', ''), '-', ''), ' ', ''), \
         '(', ''), ')', ''), '.', '')"
    )
}

/// The last 7 digits of the number: every stored form of it holds them.
fn tail(phone: &Phone) -> &str {
    let e = phone.e164();
    &e[e.len().saturating_sub(7)..]
}

async fn find(pool: &AnyPool, dir: &Path, phone: &Phone) -> Result<Found, PrivacyError> {
    let mut f = Found::default();
    let tail = tail(phone);
    let rows: Vec<(i64, String, Option<String>, Option<String>)> = sqlx::query_as(&db::sql(
        pool,
        &format!(
            "SELECT service_request_id, phone, call_id, recording FROM tickets \
         WHERE phone IS NOT NULL AND phone <> ? AND {instr}({}, ?) > 0",
            digits("phone"),
            instr = db::instr(pool)
        ),
    ))
    .bind(ERASED)
    .bind(tail)
    .fetch_all(pool)
    .await?;
    for (id, number, call_id, recording) in rows {
        if !phone.matches(&number) {
            continue;
        }
        f.tickets.push(id);
        f.call_ids.extend(call_id);
        if let Some(path) = recording.and_then(|r| crate::media::record::recording_path(dir, &r)) {
            f.recordings.insert(path);
            f.ticket_recordings.push(id);
        }
    }
    // Call history holds the number as received, or its keyed hash after a while (one per
    // form a trunk may deliver it in: three).
    let key = crate::history::hash_key(pool).await?;
    let hashes: BTreeSet<String> = (phone.received_forms().iter())
        .map(|n| crate::history::hash_number(&key, n))
        .collect();
    let rows: Vec<(i64, String, String)> = sqlx::query_as(&db::sql(
        pool,
        &format!(
        "SELECT id, caller, call_id FROM call_history WHERE caller IS NOT NULL AND caller <> ? \
         AND (caller IN (?, ?, ?) OR {instr}({}, ?) > 0)",
        digits("caller"),
            instr = db::instr(pool)
    ),
    ))
    .bind(ERASED)
    .bind(hashes.iter().next())
    .bind(hashes.iter().nth(1))
    .bind(hashes.iter().nth(2))
    .bind(tail)
    .fetch_all(pool)
    .await?;
    for (id, caller, call_id) in rows {
        if phone.matches(&caller) || hashes.contains(&caller) {
            f.history.push(id);
            f.call_ids.insert(call_id);
        }
    }
    let rows: Vec<(i64, String)> = sqlx::query_as(&db::sql(
        pool,
        &format!(
            "SELECT id, number FROM callback_requests WHERE number <> ? AND {instr}({}, ?) > 0",
            digits("number"),
            instr = db::instr(pool)
        ),
    ))
    .bind(ERASED)
    .bind(tail)
    .fetch_all(pool)
    .await?;
    f.callbacks = (rows.into_iter())
        .filter(|(_, n)| phone.matches(n))
        .map(|(id, _)| id)
        .collect();
    let rows: Vec<(i64, String)> = sqlx::query_as(&db::sql(
        pool,
        &format!(
            "SELECT id, caller FROM emergency_redirects WHERE caller IS NOT NULL \
         AND {instr}({}, ?) > 0",
            digits("caller"),
            instr = db::instr(pool)
        ),
    ))
    .bind(tail)
    .fetch_all(pool)
    .await?;
    f.emergency = (rows.into_iter())
        .filter(|(_, n)| phone.matches(n))
        .map(|(id, _)| id)
        .collect();
    let tickets: BTreeSet<i64> = f.tickets.iter().copied().collect();
    let rows: Vec<(i64, Option<i64>, Option<String>)> = sqlx::query_as(&db::sql(
        pool,
        &format!(
            "SELECT id, ticket_id, body FROM outbox WHERE ticket_id IN (SELECT service_request_id \
         FROM tickets WHERE phone IS NOT NULL AND {instr}({}, ?) > 0) \
         OR (body IS NOT NULL AND {instr}({}, ?) > 0)",
            digits("phone"),
            digits("body"),
            instr = db::instr(pool)
        ),
    ))
    .bind(tail)
    .bind(tail)
    .fetch_all(pool)
    .await?;
    for (id, ticket, body) in rows {
        let about = ticket.is_some_and(|t| tickets.contains(&t));
        let holds = body.as_deref().is_some_and(|b| {
            serde_json::from_str::<serde_json::Value>(b)
                .is_ok_and(|mut v| scrub_json(&mut v, &|_, s| phone.matches(s)))
        });
        if about || holds {
            f.outbox.push(id);
        }
    }
    for call_id in &f.call_ids {
        let path = crate::media::call_record::path_for(dir, call_id);
        if path.exists() {
            f.recordings.insert(path);
        }
    }
    Ok(f)
}

/// Rows of `table` as JSON objects (`json_object`, PostgreSQL's `json_build_object`, over `columns`) whose `key` is one
/// of `ids`.
async fn rows_json(
    pool: &AnyPool,
    table: &str,
    key: &str,
    columns: &[&str],
    ids: &[String],
) -> Result<Vec<serde_json::Value>, PrivacyError> {
    let object: Vec<String> = columns.iter().map(|c| format!("'{c}', {c}")).collect();
    let object = match pool.dialect() {
        db::Dialect::Sqlite => format!("json_object({})", object.join(", ")),
        db::Dialect::Postgres => format!("CAST(json_build_object({}) AS TEXT)", object.join(", ")),
    };
    let sql = format!("SELECT {object} FROM {table} WHERE {key} = ? ORDER BY 1");
    let mut out = Vec::new();
    for id in ids {
        let rows: Vec<String> = sqlx::query_scalar(&db::sql(pool, &sql))
            .bind(id)
            .fetch_all(pool)
            .await?;
        for r in rows {
            out.push(serde_json::from_str(&r).unwrap_or(serde_json::Value::String(r)));
        }
    }
    Ok(out)
}

fn text_ids(ids: &[i64]) -> Vec<String> {
    ids.iter().map(i64::to_string).collect()
}

/// Every row holding `phone` and the paths of the recordings linked to it, as one JSON
/// document: `{phone, tickets, call_history, callbacks, emergency_redirects, outbox,
/// transfers, recordings}`.
pub async fn export(
    store: &TicketStore,
    recordings_dir: &Path,
    phone: &Phone,
) -> Result<serde_json::Value, PrivacyError> {
    let pool = store.pool();
    let f = find(pool, recordings_dir, phone).await?;
    let tickets = rows_json(
        pool,
        "tickets",
        "CAST(service_request_id AS TEXT)",
        &[
            "service_request_id",
            "service_code",
            "service_name",
            "status",
            "status_notes",
            "description",
            "requested_datetime",
            "updated_datetime",
            "zipcode",
            "house_number",
            "address",
            "lat",
            "long",
            "phone",
            "email",
            "first_name",
            "last_name",
            "recording",
            "channel",
            "language",
            "call_id",
            "callback_requested",
            "transfer",
            "agent_id",
            "external_id",
        ],
        &text_ids(&f.tickets),
    )
    .await?;
    let history = rows_json(
        pool,
        "call_history",
        "CAST(id AS TEXT)",
        &[
            "id",
            "call_id",
            "started_ms",
            "answered_ms",
            "ended_ms",
            "caller",
            "caller_verified",
            "dialled",
            "language",
            "menu_path",
            "outcome",
            "ticket_id",
            "queue",
            "agent",
            "transferred_to",
            "callback_result",
        ],
        &text_ids(&f.history),
    )
    .await?;
    let callbacks = rows_json(
        pool,
        "callback_requests",
        "CAST(id AS TEXT)",
        &["id", "number", "at", "call_id"],
        &text_ids(&f.callbacks),
    )
    .await?;
    let emergency = rows_json(
        pool,
        "emergency_redirects",
        "CAST(id AS TEXT)",
        &[
            "id",
            "at",
            "caller",
            "caller_verified",
            "call_id",
            "menu_path",
            "reason",
            "method",
            "outcome",
            "operator",
            "destination",
        ],
        &text_ids(&f.emergency),
    )
    .await?;
    let mut outbox = rows_json(
        pool,
        "outbox",
        "CAST(id AS TEXT)",
        &[
            "id",
            "kind",
            "target",
            "ticket_id",
            "event",
            "body",
            "state",
            "created_ms",
        ],
        &text_ids(&f.outbox),
    )
    .await?;
    // Bodies are JSON text: shown as JSON.
    for item in &mut outbox {
        if let Some(body) = item.get_mut("body") {
            if let Some(parsed) = body.as_str().and_then(|b| serde_json::from_str(b).ok()) {
                *body = parsed;
            }
        }
    }
    let call_ids: Vec<String> = f.call_ids.iter().cloned().collect();
    let transfers = rows_json(
        pool,
        "transfers",
        "call_id",
        &[
            "id",
            "at",
            "call_id",
            "operator",
            "target",
            "requested_via",
            "outcome",
            "ended_at",
        ],
        &call_ids,
    )
    .await?;
    Ok(serde_json::json!({
        "phone": phone.e164(),
        "tickets": tickets,
        "call_history": history,
        "callbacks": callbacks,
        "emergency_redirects": emergency,
        "outbox": outbox,
        "transfers": transfers,
        "recordings": f.recordings.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    }))
}

/// What an erasure changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ErasureReport {
    /// Tickets whose contact fields (number, email, name) were removed.
    pub tickets: u64,
    /// Call history rows whose caller was removed.
    pub call_history: u64,
    /// Call-back requests whose number was removed.
    pub callbacks: u64,
    /// Outbox items whose payload lost the number and contact fields.
    pub outbox: u64,
    /// Recordings deleted (ticket and operator-call recordings).
    pub recordings: u64,
    /// 911 audit rows holding the number, kept as they are.
    pub emergency_redirects_kept: u64,
}

/// Removes `phone` from every table (replaced by [`ERASED`]; the rows stay), deletes the
/// recordings linked to it, and records the erasure (`privacy_erasures`: when, `by`, the
/// counts, a keyed hash of the number) and audits it in the admins' log.
pub async fn erase(
    store: &TicketStore,
    recordings_dir: &Path,
    phone: &Phone,
    by: &str,
    now: OffsetDateTime,
) -> Result<ErasureReport, PrivacyError> {
    let pool = store.pool();
    let f = find(pool, recordings_dir, phone).await?;
    let report = ErasureReport {
        tickets: f.tickets.len() as u64,
        call_history: f.history.len() as u64,
        callbacks: f.callbacks.len() as u64,
        outbox: f.outbox.len() as u64,
        recordings: f.recordings.len() as u64,
        emergency_redirects_kept: f.emergency.len() as u64,
    };
    let key = crate::history::hash_key(pool).await?;
    let number_hash = crate::history::hash_number(&key, phone.e164());
    let at = crate::dispatch::tickets::iso(crate::dispatch::tickets::whole_second_utc(now))
        .unwrap_or_default();
    let mut tx = WriteTxn::begin(pool).await?;
    let done = erase_rows(tx.conn(), &f, phone, (&at, by, &number_hash, &report)).await;
    match done {
        Ok(()) => tx.commit().await?,
        Err(e) => {
            tx.rollback().await;
            return Err(e.into());
        }
    }
    for path in &f.recordings {
        remove_file(path)?;
    }
    info!(
        target: "ivr311::audit",
        by,
        tickets = report.tickets,
        call_history = report.call_history,
        callbacks = report.callbacks,
        outbox = report.outbox,
        recordings_deleted = report.recordings,
        emergency_redirects_kept = report.emergency_redirects_kept,
        number_hash = %number_hash,
        "privacy erasure"
    );
    Ok(report)
}

async fn erase_rows(
    conn: &mut sqlx::AnyConnection,
    f: &Found,
    phone: &Phone,
    (at, by, number_hash, report): (&str, &str, &str, &ErasureReport),
) -> Result<(), sqlx::Error> {
    for id in &f.tickets {
        sqlx::query(&db::sql(
            &*conn,
            "UPDATE tickets SET phone = ?, email = NULL, first_name = NULL, last_name = NULL \
             WHERE service_request_id = ?",
        ))
        .bind(ERASED)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    for id in &f.ticket_recordings {
        sqlx::query(&db::sql(
            &*conn,
            "UPDATE tickets SET recording = NULL WHERE service_request_id = ?",
        ))
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    for id in &f.history {
        sqlx::query(&db::sql(
            &*conn,
            "UPDATE call_history SET caller = ?, number_hashed = 1 WHERE id = ?",
        ))
        .bind(ERASED)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    for id in &f.callbacks {
        sqlx::query(&db::sql(
            &*conn,
            "UPDATE callback_requests SET number = ? WHERE id = ?",
        ))
        .bind(ERASED)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    for id in &f.outbox {
        let body: Option<String> =
            sqlx::query_scalar(&db::sql(&*conn, "SELECT body FROM outbox WHERE id = ?"))
                .bind(id)
                .fetch_one(&mut *conn)
                .await?;
        let Some(mut v) = body.and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        else {
            continue;
        };
        // The number wherever it is, and the contact fields of this resident's tickets.
        scrub_json(&mut v, &|key, s| {
            phone.matches(s) || CONTACT_FIELDS.contains(&key)
        });
        sqlx::query(&db::sql(&*conn, "UPDATE outbox SET body = ? WHERE id = ?"))
            .bind(v.to_string())
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(&db::sql(
        &*conn,
        "INSERT INTO privacy_erasures (at, by_whom, number_hash, counts) VALUES (?, ?, ?, ?)",
    ))
    .bind(at)
    .bind(by)
    .bind(number_hash)
    .bind(serde_json::to_string(report).unwrap_or_default())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::retention::tests::{phone_ticket, temp_dir};
    use super::*;

    async fn count(pool: &AnyPool, table: &str) -> i64 {
        sqlx::query_scalar(&db::sql(pool, &format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn erase_removes_the_number_everywhere_but_the_911_audit_and_keeps_counts() {
        let store = TicketStore::open_in_memory().await.unwrap();
        let pool = store.pool().clone();
        let dir = temp_dir("erase");
        std::fs::write(dir.join("t.wav"), b"RIFF").unwrap();
        let call_rec = crate::media::call_record::path_for(&dir, "a@x");
        std::fs::write(&call_rec, b"RIFF").unwrap();
        let now = time::macros::datetime!(2026-12-07 12:00 UTC);
        phone_ticket(
            &store,
            "+12125550100",
            Some("t.wav"),
            "a@x",
            "2026-12-01T12:00:00Z",
        )
        .await;
        // A web request with the national form.
        phone_ticket(&store, "212-555-0100", None, "w", "2026-12-02T12:00:00Z").await;
        let other = phone_ticket(&store, "+12125550199", None, "o@x", "2026-12-02T12:00:00Z").await;
        let key = crate::history::hash_key(&pool).await.unwrap();
        sqlx::query(&db::sql(
            &pool,
            "INSERT INTO call_history (call_id, started_ms, ended_ms, caller, outcome) VALUES \
             ('a@x', 1, 2, '2125550100', 'ticket'), ('h@x', 1, 2, ?, 'info'), \
             ('o@x', 1, 2, '+12125550199', 'info')",
        ))
        .bind(crate::history::hash_number(&key, "+12125550100"))
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(&db::sql(
            &pool,
            "INSERT INTO callback_requests (number, at) VALUES ('+12125550100', 'x')",
        ))
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(&db::sql(&pool, "INSERT INTO emergency_redirects (at, caller, call_id, menu_path, method, outcome) \
             VALUES ('2026-12-01T12:00:00Z', '+12125550100', 'e@x', 'main:9', 'refer', 'connected')",))
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(&db::sql(&pool, "INSERT INTO outbox (kind, target, event, body, state, created_ms, next_ms) VALUES \
             ('webhook', 'http://h', 'request.created', \
              '{\"request\":{\"phone\":\"+12125550100\",\"email\":\"r@example.org\"}}', 'done', 0, 0)",))
        .execute(&pool)
        .await
        .unwrap();
        let phone = Phone::parse("(212) 555-0100").unwrap();
        let found = export(&store, &dir, &phone).await.unwrap();
        assert_eq!(found["tickets"].as_array().unwrap().len(), 2);
        assert_eq!(found["call_history"].as_array().unwrap().len(), 2);
        assert_eq!(found["callbacks"].as_array().unwrap().len(), 1);
        assert_eq!(found["emergency_redirects"].as_array().unwrap().len(), 1);
        assert_eq!(found["outbox"].as_array().unwrap().len(), 1);
        assert_eq!(found["recordings"].as_array().unwrap().len(), 2);
        assert_eq!(
            found["outbox"][0]["body"]["request"]["email"],
            "r@example.org"
        );

        let before: Vec<i64> = table_counts(&pool).await;
        let report = erase(&store, &dir, &phone, "clerk", now).await.unwrap();
        assert_eq!(
            report,
            ErasureReport {
                tickets: 2,
                call_history: 2,
                callbacks: 1,
                outbox: 1,
                recordings: 2,
                emergency_redirects_kept: 1,
            }
        );
        assert_eq!(table_counts(&pool).await, before, "rows stay");
        assert!(!dir.join("t.wav").exists() && !call_rec.exists());
        let after = export(&store, &dir, &phone).await.unwrap();
        for table in [
            "tickets",
            "call_history",
            "callbacks",
            "outbox",
            "recordings",
        ] {
            assert_eq!(after[table], serde_json::json!([]), "{table}");
        }
        assert_eq!(after["emergency_redirects"].as_array().unwrap().len(), 1);
        let text = after.to_string() + &found["outbox"].to_string();
        assert!(!after.to_string().contains("r@example.org"), "{text}");
        // Someone else's ticket is untouched.
        let theirs: String = sqlx::query_scalar(&db::sql(
            &pool,
            "SELECT phone FROM tickets WHERE service_request_id = ?",
        ))
        .bind(other)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(theirs, "+12125550199");
        // The erasure is recorded without the number.
        let (by, hash, counts): (String, String, String) = sqlx::query_as(&db::sql(
            &pool,
            "SELECT by_whom, number_hash, counts FROM privacy_erasures",
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(by, "clerk");
        assert_eq!(hash, crate::history::hash_number(&key, "+12125550100"));
        assert!(
            !counts.contains("555") && counts.contains("\"tickets\":2"),
            "{counts}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    async fn table_counts(pool: &AnyPool) -> Vec<i64> {
        let mut v = Vec::new();
        for t in [
            "tickets",
            "call_history",
            "callback_requests",
            "emergency_redirects",
            "outbox",
        ] {
            v.push(count(pool, t).await);
        }
        v
    }
}
