//! The history writer: one task that takes what calls and the queue hand to [`History`] and
//! writes it in batches (one transaction for everything waiting); and [`prune`], which the
//! daily retention pass (`crate::privacy::retention`) runs: rows older than
//! `retention.history_days` deleted, callers' numbers older than
//! `history.hash_numbers_after_days` hashed.

use super::report::ReportsConfig;
use super::{
    rollup, AgentStateRecord, CallRecord, History, HistoryConfig, HistoryError, Outcome,
    QueueEventRecord, Record,
};
use crate::dispatch::db;
use crate::dispatch::outbox::OutboxPlan;
use sha2::{Digest, Sha256};
use sqlx::{Any, AnyPool, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Records written in one transaction, at most: the database's write lock (which ticket
/// filing and the 911 audit also take) is held for a few milliseconds at a time.
const BATCH: usize = 256;
/// Rows deleted or hashed per statement, so a large prune never holds the write lock long.
const PRUNE_CHUNK: i64 = 5000;
const DAY_MS: i64 = 86_400_000;
/// Attempts at writing one batch before it is given up (each a second apart).
const WRITE_ATTEMPTS: u32 = 3;

/// The running writer; [`HistoryWriter::stop`] writes what is queued and ends it.
pub struct HistoryWriter {
    stop: CancellationToken,
    join: JoinHandle<()>,
}

impl HistoryWriter {
    /// Write everything already handed over, then stop. Call once nothing more will be
    /// recorded (every call has ended); records handed over later are not written.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.join.await {
            error!(error = %e, "history writer failed");
        }
    }
}

/// Start the writer on `pool` (the ticket database, migrated).
pub fn spawn_writer(
    pool: AnyPool,
    config: HistoryConfig,
    reports: ReportsConfig,
    metrics: Arc<crate::metrics::Metrics>,
    outbox: Arc<OutboxPlan>,
) -> (History, HistoryWriter) {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let stop = CancellationToken::new();
    let join = tokio::spawn(run(
        pool,
        (reports, outbox),
        rx,
        stop.clone(),
        metrics.clone(),
    ));
    (History::new(tx, metrics), HistoryWriter { stop, join })
}

async fn run(
    pool: AnyPool,
    (reports, outbox): (ReportsConfig, Arc<OutboxPlan>),
    mut rx: mpsc::Receiver<Record>,
    stop: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
) {
    // Records wait in the channel meanwhile.
    match rollup::rebuild_if_changed(&pool, &reports).await {
        Ok(true) => info!("report rollup rebuilt for the configured thresholds"),
        Ok(false) => {}
        Err(e) => error!(error = %e, "report rollup could not be rebuilt; reports may be off"),
    }
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
                write_batch(&pool, (&reports, &outbox), &mut batch, &metrics).await;
            }
        }
    }
    // A clean stop: everything handed over so far is written.
    rx.close();
    let mut left = 0;
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        left += batch.len();
        write_batch(&pool, (&reports, &outbox), &mut batch, &metrics).await;
    }
    debug!(written_at_stop = left, "history writer stopped");
}

async fn write_batch(
    pool: &AnyPool,
    (reports, outbox): (&ReportsConfig, &OutboxPlan),
    batch: &mut Vec<Record>,
    metrics: &crate::metrics::Metrics,
) {
    for attempt in 1..=WRITE_ATTEMPTS {
        match write(pool, reports, outbox, batch).await {
            Ok(()) => {
                batch.clear();
                return;
            }
            Err(e) if attempt < WRITE_ATTEMPTS => {
                warn!(error = %e, records = batch.len(), attempt, "history write failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                error!(error = %e, records = batch.len(), "history write failed; records lost");
                metrics.add(
                    "ivr311_history_dropped_total",
                    "History records dropped because the writer was behind (history.queue full).",
                    &[],
                    batch.len() as u64,
                );
            }
        }
    }
    batch.clear();
}

/// Write `records` in one transaction (and the rollup with them, and `call.ended` for the
/// webhooks that take it).
pub(crate) async fn write(
    pool: &AnyPool,
    reports: &ReportsConfig,
    outbox: &OutboxPlan,
    records: &[Record],
) -> Result<(), HistoryError> {
    let mut tx = pool.begin().await?;
    db::lock_writes(&mut tx).await?;
    // Calls inserted and not yet in the rollup. Within one transaction the database's write
    // lock (on PostgreSQL, the write lock every node takes) keeps anyone else from inserting, so their ids form one range and the rollup
    // takes them in one aggregate statement instead of one per call. A record that changes
    // a call already written (a call-back's result, a wrap-up) needs that call in the
    // rollup first, so the range is added before it.
    let mut unrolled: Option<(i64, i64)> = None;
    for r in records {
        if matches!(r, Record::CallbackResult { .. } | Record::AgentState(_)) {
            if let Some(range) = unrolled.take() {
                rollup::add_calls(&mut tx, reports, range).await?;
            }
        }
        match r {
            Record::Call(c) => {
                let id = insert_call(&mut tx, c).await?;
                unrolled = Some(unrolled.map_or((id, id), |(first, _)| (first, id)));
                if outbox.wants(crate::dispatch::outbox::Event::CallEnded) {
                    outbox.call_ended(&mut tx, call_summary(c)).await?;
                }
            }
            Record::Queue(q) => insert_queue_event(&mut tx, q).await?,
            Record::AgentState(s) => insert_agent_state(&mut tx, s).await?,
            Record::CallbackResult {
                call_id,
                attempts,
                result,
            } => {
                let ids: Vec<i64> = sqlx::query_scalar(&db::sql(
                    &*tx,
                    "SELECT id FROM call_history WHERE call_id = ? AND outcome = 'callback' \
                     AND callback_result = 'pending'",
                ))
                .bind(call_id)
                .fetch_all(&mut *tx)
                .await?;
                for id in ids {
                    sqlx::query(&db::sql(
                        &*tx,
                        "UPDATE call_history SET callback_attempts = ?, callback_result = ? \
                         WHERE id = ?",
                    ))
                    .bind(*attempts as i64)
                    .bind(*result)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    rollup::add_callback_result(&mut tx, id, result).await?;
                }
            }
        }
    }
    if let Some(range) = unrolled {
        rollup::add_calls(&mut tx, reports, range).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A call as `call.ended` tells it: no caller number.
fn call_summary(c: &CallRecord) -> serde_json::Value {
    let ticket = match &c.outcome {
        Outcome::Ticket { id, .. } => id.map(|i| i.to_string()),
        _ => None,
    };
    serde_json::json!({
        "call_id": c.call_id,
        "started_ms": c.started_ms,
        "answered_ms": c.answered_ms,
        "ended_ms": c.ended_ms,
        "language": c.language,
        "menu_path": c.menu_path,
        "outcome": c.outcome.as_str(),
        "end_reason": c.end_reason,
        "service_request_id": ticket,
        "queue": c.queue.as_ref().map(|q| q.queue.clone()),
        "agent": c.queue.as_ref().and_then(|q| q.agent.clone()),
    })
}

/// Insert the call's row; its id.
async fn insert_call(tx: &mut Transaction<'_, Any>, c: &CallRecord) -> Result<i64, sqlx::Error> {
    let (mut ticket_id, mut ticket_service, mut audit, mut ab_in, mut ab_after) =
        (None, None, None, None, None);
    let (mut rejected_code, mut rejected_why, mut callback_result) = (None, None, None);
    match &c.outcome {
        Outcome::Ticket { id, service } => {
            ticket_id = id.map(|i| i as i64);
            ticket_service = Some(service.clone());
        }
        Outcome::Emergency { audit_id } => audit = *audit_id,
        Outcome::Abandoned { at, after_ms } => {
            ab_in = Some(at.as_str());
            ab_after = Some(*after_ms);
        }
        Outcome::Rejected { code, why } => {
            rejected_code = Some(i64::from(*code));
            rejected_why = Some(why.clone());
        }
        Outcome::Callback => callback_result = Some("pending"),
        Outcome::Info | Outcome::Bridged => {}
    }
    let q = c.queue.as_ref();
    sqlx::query_scalar(&db::sql(
        &**tx,
        "INSERT INTO call_history (call_id, started_ms, answered_ms, ended_ms, caller, \
         caller_verified, dialled, language, menu_path, outcome, end_reason, ticket_id, \
         ticket_service, emergency_audit_id, queue, queue_entered_ms, wait_ms, agent, talk_ms, \
         abandoned_in, abandoned_after_ms, callback_result, rejected_code, rejected_why) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         RETURNING id",
    ))
    .bind(&c.call_id)
    .bind(c.started_ms)
    .bind(c.answered_ms)
    .bind(c.ended_ms)
    .bind(&c.caller)
    .bind(c.caller_verified as i64)
    .bind(&c.dialled)
    .bind(&c.language)
    .bind(&c.menu_path)
    .bind(c.outcome.as_str())
    .bind(&c.end_reason)
    .bind(ticket_id)
    .bind(ticket_service)
    .bind(audit)
    .bind(q.map(|q| q.queue.clone()))
    .bind(q.map(|q| q.entered_ms))
    .bind(q.map(|q| q.wait_ms))
    .bind(q.and_then(|q| q.agent.clone()))
    .bind(q.and_then(|q| q.talk_ms))
    .bind(ab_in)
    .bind(ab_after)
    .bind(callback_result)
    .bind(rejected_code)
    .bind(rejected_why)
    .fetch_one(&mut **tx)
    .await
}

async fn insert_queue_event(
    tx: &mut Transaction<'_, Any>,
    q: &QueueEventRecord,
) -> Result<(), sqlx::Error> {
    sqlx::query(&db::sql(&**tx, "INSERT INTO queue_events (at_ms, call_id, queue, agent, event, wait_ms, talk_ms, position) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",))
    .bind(q.at_ms)
    .bind(&q.call_id)
    .bind(&q.queue)
    .bind(&q.agent)
    .bind(q.event.as_str())
    .bind(q.wait_ms)
    .bind(q.talk_ms)
    .bind(q.position)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_agent_state(
    tx: &mut Transaction<'_, Any>,
    s: &AgentStateRecord,
) -> Result<(), sqlx::Error> {
    sqlx::query(&db::sql(
        &**tx,
        "INSERT INTO agent_states (agent, state, reason, started_ms, ended_ms) \
         VALUES (?, ?, ?, ?, ?)",
    ))
    .bind(&s.agent)
    .bind(s.state)
    .bind(&s.reason)
    .bind(s.started_ms)
    .bind(s.ended_ms)
    .execute(&mut **tx)
    .await?;
    if s.state == "wrap_up" {
        // The operator's call that ended as this wrap-up began (the call's own clock and the
        // queue's differ by the moment the report took to arrive).
        let id: Option<i64> = sqlx::query_scalar(&db::sql(
            &**tx,
            "SELECT id FROM call_history \
             WHERE agent = ? AND outcome = 'bridged' AND wrap_up_ms IS NULL \
             AND ended_ms BETWEEN ? AND ? ORDER BY abs(ended_ms - ?) LIMIT 1",
        ))
        .bind(&s.agent)
        .bind(s.started_ms - 10_000)
        .bind(s.started_ms + 10_000)
        .bind(s.started_ms)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(id) = id {
            let wrap_up = s.ended_ms - s.started_ms;
            sqlx::query(&db::sql(
                &**tx,
                "UPDATE call_history SET wrap_up_ms = ? WHERE id = ?",
            ))
            .bind(wrap_up)
            .bind(id)
            .execute(&mut **tx)
            .await?;
            rollup::add_wrap_up(tx, id, wrap_up).await?;
        }
    }
    Ok(())
}

/// The key callers' numbers are hashed with, made on first use.
pub(crate) async fn hash_key(pool: &AnyPool) -> Result<Vec<u8>, sqlx::Error> {
    let key: [u8; 32] = rand::random();
    sqlx::query(&db::sql(
        pool,
        "INSERT INTO history_key (id, key) VALUES (1, ?) ON CONFLICT DO NOTHING",
    ))
    .bind(&key[..])
    .execute(pool)
    .await?;
    sqlx::query_scalar(&db::sql(pool, "SELECT key FROM history_key WHERE id = 1"))
        .fetch_one(pool)
        .await
}

/// A number as kept after `hash_numbers_after_days`: `h:` and 16 bytes of
/// SHA-256(key ‖ number), hex.
pub(crate) fn hash_number(key: &[u8], number: &str) -> String {
    let mut h = Sha256::new();
    h.update(key);
    h.update(number.as_bytes());
    let d = h.finalize();
    let mut s = String::with_capacity(34);
    s.push_str("h:");
    for b in &d[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Delete rows older than `keep_days` (0 keeps them) and hash numbers older than
/// `config.hash_numbers_after_days`, as of `now_ms`. Returns (rows deleted, numbers hashed).
pub(crate) async fn prune(
    pool: &AnyPool,
    config: &HistoryConfig,
    keep_days: u32,
    now_ms: i64,
) -> Result<(u64, u64), HistoryError> {
    let cutoff = if keep_days == 0 {
        i64::MIN
    } else {
        now_ms - i64::from(keep_days) * DAY_MS
    };
    rollup::prune(pool, cutoff).await?;
    let mut deleted = 0;
    for (table, column) in [
        ("call_history", "started_ms"),
        ("agent_states", "started_ms"),
        ("queue_events", "at_ms"),
    ] {
        loop {
            let sql = format!(
                "DELETE FROM {table} WHERE id IN \
                 (SELECT id FROM {table} WHERE {column} < ? LIMIT ?)"
            );
            let n = sqlx::query(&db::sql(pool, &sql))
                .bind(cutoff)
                .bind(PRUNE_CHUNK)
                .execute(pool)
                .await?
                .rows_affected();
            deleted += n;
            if n < PRUNE_CHUNK as u64 {
                break;
            }
        }
    }
    let hash_before = now_ms - i64::from(config.hash_numbers_after_days) * DAY_MS;
    let key = hash_key(pool).await?;
    let mut hashed = 0;
    loop {
        let rows: Vec<(i64, Option<String>)> = sqlx::query_as(&db::sql(
            pool,
            "SELECT id, caller FROM call_history WHERE number_hashed = 0 AND started_ms < ? \
             LIMIT ?",
        ))
        .bind(hash_before)
        .bind(PRUNE_CHUNK)
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        let mut tx = pool.begin().await?;
        for (id, caller) in &rows {
            let h = caller.as_deref().map(|c| hash_number(&key, c));
            sqlx::query(&db::sql(
                &*tx,
                "UPDATE call_history SET caller = ?, number_hashed = 1 WHERE id = ?",
            ))
            .bind(h)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        hashed += rows.len() as u64;
    }
    Ok((deleted, hashed))
}

#[cfg(test)]
mod tests {
    use super::super::{AbandonedIn, QueueVisit};
    use super::*;
    use crate::dispatch::tickets::TicketStore;

    pub(crate) fn call(id: &str, started_ms: i64, outcome: Outcome) -> CallRecord {
        CallRecord {
            call_id: id.into(),
            started_ms,
            answered_ms: Some(started_ms + 100),
            ended_ms: started_ms + 60_000,
            caller: "+15551230000".into(),
            caller_verified: true,
            dialled: "311".into(),
            language: Some("en".into()),
            menu_path: Some("language:1".into()),
            outcome,
            end_reason: Some("CallerHungUp".into()),
            queue: None,
        }
    }

    #[tokio::test]
    async fn prune_deletes_old_rows_and_hashes_old_numbers_only() {
        let store = TicketStore::open_in_memory().await.unwrap();
        let pool = store.pool().clone();
        let now = 1_800_000_000_000;
        let records = vec![
            Record::Call(Box::new(call("old", now - 401 * DAY_MS, Outcome::Info))),
            Record::Call(Box::new(call("mid", now - 100 * DAY_MS, Outcome::Info))),
            Record::Call(Box::new(call("new", now - DAY_MS, Outcome::Info))),
        ];
        write(
            &pool,
            &ReportsConfig::default(),
            &OutboxPlan::default(),
            &records,
        )
        .await
        .unwrap();
        let (deleted, hashed) = prune(&pool, &HistoryConfig::default(), 400, now)
            .await
            .unwrap();
        assert_eq!((deleted, hashed), (1, 1));
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(&db::sql(
            &pool,
            "SELECT call_id, caller FROM call_history ORDER BY started_ms",
        ))
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 2);
        let mid = rows[0].1.as_deref().unwrap();
        assert!(
            mid.starts_with("h:") && !mid.contains("5551230000"),
            "{mid}"
        );
        assert_eq!(rows[1].1.as_deref(), Some("+15551230000"));
        // Hashed with the database's key: the same number gives the same hash there.
        let key = hash_key(&pool).await.unwrap();
        assert_eq!(hash_number(&key, "+15551230000"), mid);
        assert_ne!(hash_number(&[0; 32], "+15551230000"), mid);
    }

    #[tokio::test]
    async fn a_wrap_up_span_completes_its_operators_call() {
        let store = TicketStore::open_in_memory().await.unwrap();
        let pool = store.pool().clone();
        let t = 1_800_000_000_000;
        let mut c = call("b", t, Outcome::Bridged);
        c.queue = Some(QueueVisit {
            queue: "general".into(),
            entered_ms: t + 5000,
            wait_ms: 12_000,
            agent: Some("1001".into()),
            talk_ms: Some(40_000),
        });
        let ended = c.ended_ms;
        write(
            &pool,
            &ReportsConfig::default(),
            &OutboxPlan::default(),
            &[Record::Call(Box::new(c))],
        )
        .await
        .unwrap();
        write(
            &pool,
            &ReportsConfig::default(),
            &OutboxPlan::default(),
            &[Record::AgentState(AgentStateRecord {
                agent: "1001".into(),
                state: "wrap_up",
                reason: None,
                started_ms: ended + 20,
                ended_ms: ended + 10_020,
            })],
        )
        .await
        .unwrap();
        let w: Option<i64> =
            sqlx::query_scalar(&db::sql(&pool, "SELECT wrap_up_ms FROM call_history"))
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(w, Some(10_000));
        let _ = AbandonedIn::Menu;
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_blocking_and_stop_writes_the_rest() {
        let store = TicketStore::open_in_memory().await.unwrap();
        let pool = store.pool().clone();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let config = HistoryConfig {
            queue: 4,
            ..HistoryConfig::default()
        };
        let (history, writer) = spawn_writer(
            pool.clone(),
            config,
            ReportsConfig::default(),
            metrics.clone(),
            Arc::default(),
        );
        // Hold the database's only connection so the writer cannot write meanwhile.
        let held = pool.acquire().await.unwrap();
        for i in 0..50 {
            history.record(Record::Call(Box::new(call(
                &format!("c{i}"),
                i,
                Outcome::Info,
            ))));
        }
        assert!(history.dropped() > 0);
        assert_eq!(
            metrics.get("ivr311_history_dropped_total", &[]),
            history.dropped()
        );
        drop(held);
        writer.stop().await;
        let n: i64 = sqlx::query_scalar(&db::sql(&pool, "SELECT count(*) FROM call_history"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n as u64, 50 - history.dropped());
    }
}
