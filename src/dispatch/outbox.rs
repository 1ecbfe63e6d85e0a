//! The durable outbox: what the city's CRM (`forward.open311`) and the webhooks are owed,
//! written in the same transaction as the change it announces (a ticket filed, its status
//! changed, a caller sent to 911), and the queries the delivery worker
//! ([`crate::forward`]) runs on it.
//!
//! Owns the `outbox` table and the tickets' `external_id` / `external_token` columns. Nothing
//! here touches the network: the worker sends, and reports back through these methods.
//!
//! # Rows
//!
//! `pending` (due at `next_ms`) → `in_flight` (claimed by the worker, `attempts` counted) →
//! `done`, or back to `pending` with a later `next_ms` (a retry), or `dead` (given up,
//! `last_error` says why; `POST /admin/outbox/{id}/retry` makes it `pending` again). A CRM
//! request for a ticket is one row for ever (a unique index), and it becomes `done` in the
//! same transaction that stores the CRM's number on the ticket, so an acknowledged request
//! is never sent again.

use crate::dispatch::db;
use crate::dispatch::tickets::{
    column, fail, ticket_from_row, StoreError, Ticket, TicketStore, WriteTxn, TICKET_COLUMNS,
};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use std::fmt;
use std::str::FromStr;
use time::OffsetDateTime;

/// What a webhook may be told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Event {
    /// A ticket was filed (phone, console or API).
    #[serde(rename = "request.created")]
    RequestCreated,
    /// A ticket's status or notes changed (staff, the admin API, or the CRM).
    #[serde(rename = "request.updated")]
    RequestUpdated,
    /// A caller was sent on to emergency services (the audit row was written).
    #[serde(rename = "emergency.redirected")]
    EmergencyRedirected,
    /// A call ended (its history row was written).
    #[serde(rename = "call.ended")]
    CallEnded,
}

impl Event {
    /// The spelling in config, in bodies and in the outbox table.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::RequestCreated => "request.created",
            Event::RequestUpdated => "request.updated",
            Event::EmergencyRedirected => "emergency.redirected",
            Event::CallEnded => "call.ended",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Event {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "request.created" => Ok(Event::RequestCreated),
            "request.updated" => Ok(Event::RequestUpdated),
            "emergency.redirected" => Ok(Event::EmergencyRedirected),
            "call.ended" => Ok(Event::CallEnded),
            _ => Err(StoreError::BadRow {
                column: "event",
                value: s.to_owned(),
            }),
        }
    }
}

/// The ticket fields a webhook may carry, as [`Ticket`] serialises them.
pub const TICKET_FIELDS: &[&str] = &[
    "service_request_id",
    "status",
    "status_notes",
    "service_name",
    "service_code",
    "description",
    "agency_responsible",
    "service_notice",
    "requested_datetime",
    "updated_datetime",
    "expected_datetime",
    "address",
    "address_id",
    "zipcode",
    "lat",
    "long",
    "media_url",
    "channel",
    "language",
    "external_id",
    "phone",
    "email",
    "first_name",
    "last_name",
    "call_id",
    "callback_requested",
    "agent_id",
];

/// Ticket fields that are personal data: on a webhook only when its `fields` names them.
pub const PERSONAL_FIELDS: &[&str] = &["phone", "email", "first_name", "last_name"];

/// One webhook as the store needs it: where, for which events, with which ticket fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WebhookPlan {
    pub(crate) url: String,
    pub(crate) events: Vec<Event>,
    pub(crate) fields: Vec<String>,
}

/// What each change owes the outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OutboxPlan {
    /// Every new ticket is forwarded to the CRM.
    pub(crate) open311: bool,
    pub(crate) webhooks: Vec<WebhookPlan>,
}

/// Whether an outbox row goes to the CRM or to a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    Open311,
    Webhook,
}

impl OutboxPlan {
    pub(crate) fn is_empty(&self) -> bool {
        !self.open311 && self.webhooks.is_empty()
    }

    /// Whether some webhook takes `event`.
    pub(crate) fn wants(&self, event: Event) -> bool {
        self.webhooks.iter().any(|w| w.events.contains(&event))
    }

    /// Rows for a ticket just inserted on `conn` (inside its transaction): the CRM request,
    /// and `request.created` for the webhooks that take it.
    pub(crate) async fn ticket_filed(
        &self,
        conn: &mut AnyConnection,
        t: &Ticket,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        if self.open311 {
            let now_ms = epoch_ms(now);
            sqlx::query(&db::sql(
                &*conn,
                "INSERT INTO outbox (kind, ticket_id, event, state, created_ms, next_ms) \
                 VALUES ('open311', ?, 'request.created', 'pending', ?, ?)",
            ))
            .bind(i64::try_from(t.service_request_id).unwrap_or(0))
            .bind(now_ms)
            .bind(now_ms)
            .execute(&mut *conn)
            .await?;
        }
        self.ticket_event(conn, Event::RequestCreated, t).await
    }

    /// `event` about ticket `t`, for each webhook that takes it, with that webhook's fields.
    pub(crate) async fn ticket_event(
        &self,
        conn: &mut AnyConnection,
        event: Event,
        t: &Ticket,
    ) -> Result<(), sqlx::Error> {
        let full = serde_json::to_value(t).unwrap_or_default();
        for w in self.webhooks.iter().filter(|w| w.events.contains(&event)) {
            let mut request = serde_json::Map::new();
            for f in &w.fields {
                if let Some(v) = full.get(f.as_str()) {
                    // Numbers as Open311 gives them: text.
                    let v = match (f.as_str(), v) {
                        ("service_request_id", serde_json::Value::Number(n)) => {
                            serde_json::Value::String(n.to_string())
                        }
                        _ => v.clone(),
                    };
                    request.insert(f.clone(), v);
                }
            }
            let body = envelope(event, serde_json::json!({ "request": request }));
            insert_webhook(conn, &w.url, event, Some(t.service_request_id), &body).await?;
        }
        Ok(())
    }

    /// `emergency.redirected` for the webhooks that take it: where in the menu, how, and
    /// who (an operator), never the caller's number.
    pub(crate) async fn emergency_redirected(
        &self,
        conn: &mut AnyConnection,
        e: &crate::dispatch::tickets::EmergencyAudit,
        at: &str,
    ) -> Result<(), sqlx::Error> {
        let body = envelope(
            Event::EmergencyRedirected,
            serde_json::json!({
                "redirect": {
                    "at": at,
                    "call_id": e.call_id,
                    "menu_path": e.menu_path,
                    "reason": e.reason,
                    "method": e.method,
                    "operator": e.operator,
                    "requested_via": e.requested_via,
                }
            }),
        );
        for w in self
            .webhooks
            .iter()
            .filter(|w| w.events.contains(&Event::EmergencyRedirected))
        {
            insert_webhook(conn, &w.url, Event::EmergencyRedirected, None, &body).await?;
        }
        Ok(())
    }

    /// `call.ended` for the webhooks that take it (`call` is the call's summary, with no
    /// caller number).
    pub(crate) async fn call_ended(
        &self,
        conn: &mut AnyConnection,
        call: serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        let body = envelope(Event::CallEnded, serde_json::json!({ "call": call }));
        for w in self
            .webhooks
            .iter()
            .filter(|w| w.events.contains(&Event::CallEnded))
        {
            insert_webhook(conn, &w.url, Event::CallEnded, None, &body).await?;
        }
        Ok(())
    }
}

/// `{"id": <random delivery id>, "event": ..., "at": <now>, ...rest}`.
fn envelope(event: Event, rest: serde_json::Value) -> String {
    let id: u128 = rand::random();
    let mut body = serde_json::Map::new();
    body.insert("id".into(), format!("{id:032x}").into());
    body.insert("event".into(), event.as_str().into());
    let at = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    body.insert("at".into(), at.into());
    if let serde_json::Value::Object(rest) = rest {
        body.extend(rest);
    }
    serde_json::Value::Object(body).to_string()
}

async fn insert_webhook(
    conn: &mut AnyConnection,
    url: &str,
    event: Event,
    ticket: Option<u64>,
    body: &str,
) -> Result<(), sqlx::Error> {
    let now_ms = epoch_ms(OffsetDateTime::now_utc());
    sqlx::query(&db::sql(
        &*conn,
        "INSERT INTO outbox (kind, target, ticket_id, event, body, state, created_ms, next_ms) \
         VALUES ('webhook', ?, ?, ?, ?, 'pending', ?, ?)",
    ))
    .bind(url)
    .bind(ticket.and_then(|t| i64::try_from(t).ok()))
    .bind(event.as_str())
    .bind(body)
    .bind(now_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Unix epoch milliseconds.
pub(crate) fn epoch_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A row claimed for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxItem {
    pub(crate) id: i64,
    pub(crate) kind: Kind,
    /// The webhook's URL.
    pub(crate) target: Option<String>,
    pub(crate) ticket_id: Option<u64>,
    pub(crate) event: Event,
    /// The webhook's body.
    pub(crate) body: Option<String>,
    /// Including this one.
    pub(crate) attempts: u32,
}

/// A row as `GET /admin/outbox` shows it (no body: it may carry personal fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct OutboxRow {
    pub(crate) id: i64,
    pub(crate) kind: Kind,
    pub(crate) target: Option<String>,
    /// Our ticket number, as text like Open311's.
    pub(crate) service_request_id: Option<String>,
    pub(crate) event: String,
    pub(crate) state: String,
    pub(crate) attempts: u32,
    pub(crate) created_ms: i64,
    pub(crate) next_ms: i64,
    pub(crate) done_ms: Option<i64>,
    pub(crate) last_error: Option<String>,
}

/// How the CRM acknowledged a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Its `service_request_id`.
    Id(String),
    /// A `token` to be resolved later with `GET tokens/{token}`.
    Token(String),
}

/// Queue depth and the age of the oldest item not yet delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct OutboxStats {
    /// Rows `pending` or `in_flight`.
    pub(crate) depth: u64,
    /// Rows `dead`.
    pub(crate) dead: u64,
    /// `created_ms` of the oldest `pending` or `in_flight` row.
    pub(crate) oldest_ms: Option<i64>,
}

const ITEM_COLUMNS: &str = "id, kind, target, ticket_id, event, body, attempts";
const ROW_COLUMNS: &str =
    "id, kind, target, ticket_id, event, state, attempts, created_ms, next_ms, done_ms, last_error";

fn kind(text: &str) -> Result<Kind, StoreError> {
    match text {
        "open311" => Ok(Kind::Open311),
        "webhook" => Ok(Kind::Webhook),
        _ => Err(StoreError::BadRow {
            column: "kind",
            value: text.to_owned(),
        }),
    }
}

fn ticket_id(row: &AnyRow) -> Result<Option<u64>, StoreError> {
    let id: Option<i64> = column(row, "ticket_id")?;
    Ok(id.and_then(|i| u64::try_from(i).ok()))
}

fn item_from_row(row: &AnyRow) -> Result<OutboxItem, StoreError> {
    let k: String = column(row, "kind")?;
    let e: String = column(row, "event")?;
    let attempts: i64 = column(row, "attempts")?;
    Ok(OutboxItem {
        id: column(row, "id")?,
        kind: kind(&k)?,
        target: column(row, "target")?,
        ticket_id: ticket_id(row)?,
        event: e.parse()?,
        body: column(row, "body")?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
    })
}

fn outbox_row(row: &AnyRow) -> Result<OutboxRow, StoreError> {
    let k: String = column(row, "kind")?;
    let attempts: i64 = column(row, "attempts")?;
    Ok(OutboxRow {
        id: column(row, "id")?,
        kind: kind(&k)?,
        target: column(row, "target")?,
        service_request_id: ticket_id(row)?.map(|t| t.to_string()),
        event: column(row, "event")?,
        state: column(row, "state")?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        created_ms: column(row, "created_ms")?,
        next_ms: column(row, "next_ms")?,
        done_ms: column(row, "done_ms")?,
        last_error: column(row, "last_error")?,
    })
}

/// The reason stored on a CRM request found `in_flight` at start: it was being sent when the
/// server stopped, so the CRM may have it.
pub(crate) const INTERRUPTED: &str = "delivery was interrupted by a restart and the CRM may \
     have filed it: check the CRM for this ticket before retrying";

impl TicketStore {
    /// At start: rows left `in_flight` by a server that stopped mid-send. A webhook is sent
    /// again (its body carries a delivery `id` receivers can deduplicate on); a CRM request
    /// is dead-lettered with [`INTERRUPTED`], so a request the CRM may have filed is never
    /// filed twice. Returns how many of each.
    pub(crate) async fn outbox_recover(&self) -> Result<(u64, u64), StoreError> {
        let resent = sqlx::query(&db::sql(
            self.pool(),
            "UPDATE outbox SET state = 'pending' WHERE state = 'in_flight' AND kind = 'webhook'",
        ))
        .execute(self.pool())
        .await
        .map_err(|e| fail("outbox_recover", e))?
        .rows_affected();
        let dead = sqlx::query(&db::sql(
            self.pool(),
            "UPDATE outbox SET state = 'dead', last_error = ? \
             WHERE state = 'in_flight' AND kind = 'open311'",
        ))
        .bind(INTERRUPTED)
        .execute(self.pool())
        .await
        .map_err(|e| fail("outbox_recover", e))?
        .rows_affected();
        Ok((resent, dead))
    }

    /// Marks up to `limit` due rows `in_flight` (counting the attempt) and returns them,
    /// oldest first.
    pub(crate) async fn outbox_claim(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let sql = format!(
            "UPDATE outbox SET state = 'in_flight', attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM outbox WHERE state = 'pending' AND next_ms <= ? \
             ORDER BY id LIMIT ?) AND state = 'pending' RETURNING {ITEM_COLUMNS}"
        );
        let rows = sqlx::query(&db::sql(self.pool(), &sql))
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(|e| fail("outbox_claim", e))?;
        let mut items = rows
            .iter()
            .map(item_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        items.sort_by_key(|i| i.id);
        Ok(items)
    }

    /// When the next `pending` row is due, if any.
    pub(crate) async fn outbox_next_due(&self) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar(&db::sql(
            self.pool(),
            "SELECT MIN(next_ms) FROM outbox WHERE state = 'pending'",
        ))
        .fetch_one(self.pool())
        .await
        .map_err(|e| fail("outbox_next_due", e))
    }

    /// Row `id` was delivered.
    pub(crate) async fn outbox_done(&self, id: i64, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(&db::sql(
            self.pool(),
            "UPDATE outbox SET state = 'done', done_ms = ?, last_error = NULL WHERE id = ?",
        ))
        .bind(now_ms)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(|e| fail("outbox_done", e))?;
        Ok(())
    }

    /// The CRM filed ticket `ticket` (row `id`): its number or token goes on the ticket and
    /// the row is done, in one transaction.
    pub(crate) async fn outbox_crm_done(
        &self,
        id: i64,
        ticket: u64,
        ack: &Ack,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let ticket = i64::try_from(ticket).unwrap_or(0);
        let mut tx = WriteTxn::begin(self.pool())
            .await
            .map_err(|e| fail("outbox_crm_done", e))?;
        let (sql, value) = match ack {
            Ack::Id(v) => (
                "UPDATE tickets SET external_id = ? WHERE service_request_id = ?",
                v,
            ),
            Ack::Token(v) => (
                "UPDATE tickets SET external_token = ? WHERE service_request_id = ?",
                v,
            ),
        };
        let step = async {
            sqlx::query(&db::sql(tx.conn(), sql))
                .bind(value)
                .bind(ticket)
                .execute(tx.conn())
                .await?;
            sqlx::query(&db::sql(
                tx.conn(),
                "UPDATE outbox SET state = 'done', done_ms = ?, last_error = NULL WHERE id = ?",
            ))
            .bind(now_ms)
            .bind(id)
            .execute(tx.conn())
            .await
        }
        .await;
        if let Err(e) = step {
            tx.rollback().await;
            return Err(fail("outbox_crm_done", e));
        }
        tx.commit().await.map_err(|e| fail("outbox_crm_done", e))
    }

    /// Row `id` failed and is tried again at `next_ms`.
    pub(crate) async fn outbox_retry_at(
        &self,
        id: i64,
        next_ms: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(&db::sql(
            self.pool(),
            "UPDATE outbox SET state = 'pending', next_ms = ?, last_error = ? WHERE id = ?",
        ))
        .bind(next_ms)
        .bind(error)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(|e| fail("outbox_retry_at", e))?;
        Ok(())
    }

    /// Row `id` is given up (`reason` shown in `/admin/outbox`).
    pub(crate) async fn outbox_dead(&self, id: i64, reason: &str) -> Result<(), StoreError> {
        sqlx::query(&db::sql(
            self.pool(),
            "UPDATE outbox SET state = 'dead', last_error = ? WHERE id = ?",
        ))
        .bind(reason)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(|e| fail("outbox_dead", e))?;
        Ok(())
    }

    /// A dead row goes back to `pending`, due at `now_ms`, its attempts counted afresh.
    /// False if there is no dead row `id`.
    pub(crate) async fn outbox_revive(&self, id: i64, now_ms: i64) -> Result<bool, StoreError> {
        let n = sqlx::query(&db::sql(
            self.pool(),
            "UPDATE outbox SET state = 'pending', next_ms = ?, attempts = 0 \
             WHERE id = ? AND state = 'dead'",
        ))
        .bind(now_ms)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(|e| fail("outbox_revive", e))?
        .rows_affected();
        if n == 1 {
            self.outbox_wake.notify_one();
        }
        Ok(n == 1)
    }

    /// Rows in `state` (all states when `None`), newest first, at most `limit`.
    pub(crate) async fn outbox_list(
        &self,
        state: Option<&str>,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM outbox WHERE (? IS NULL OR state = ?) \
             ORDER BY id DESC LIMIT ?"
        );
        let rows = sqlx::query(&db::sql(self.pool(), &sql))
            .bind(state)
            .bind(state)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(|e| fail("outbox_list", e))?;
        rows.iter().map(outbox_row).collect()
    }

    /// Depth, dead rows and the oldest undelivered row.
    pub(crate) async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let row = sqlx::query(&db::sql(
            self.pool(),
            "SELECT \
             (SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'in_flight')) AS depth, \
             (SELECT COUNT(*) FROM outbox WHERE state = 'dead') AS dead, \
             (SELECT MIN(created_ms) FROM outbox WHERE state IN ('pending', 'in_flight')) \
             AS oldest",
        ))
        .fetch_one(self.pool())
        .await
        .map_err(|e| fail("outbox_stats", e))?;
        let depth: i64 = row.try_get("depth").unwrap_or(0);
        let dead: i64 = row.try_get("dead").unwrap_or(0);
        Ok(OutboxStats {
            depth: u64::try_from(depth).unwrap_or(0),
            dead: u64::try_from(dead).unwrap_or(0),
            oldest_ms: row.try_get("oldest").unwrap_or(None),
        })
    }

    /// Open tickets the CRM has filed, numbers above `after`, in number order, at most
    /// `limit`: the ones whose status the poller asks the CRM about.
    pub(crate) async fn crm_open(&self, after: u64, limit: u32) -> Result<Vec<Ticket>, StoreError> {
        let sql = format!(
            "SELECT {TICKET_COLUMNS} FROM tickets WHERE external_id IS NOT NULL \
             AND status = 'open' AND service_request_id > ? ORDER BY service_request_id LIMIT ?"
        );
        let rows = sqlx::query(&db::sql(self.pool(), &sql))
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(|e| fail("crm_open", e))?;
        rows.iter().map(ticket_from_row).collect()
    }

    /// Tickets the CRM answered with a token it has not yet turned into a number.
    pub(crate) async fn crm_tokens(&self, limit: u32) -> Result<Vec<(u64, String)>, StoreError> {
        let rows = sqlx::query(&db::sql(
            self.pool(),
            "SELECT service_request_id, external_token FROM tickets \
             WHERE external_token IS NOT NULL AND external_id IS NULL LIMIT ?",
        ))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(|e| fail("crm_tokens", e))?;
        rows.iter()
            .map(|r| {
                let id: i64 = column(r, "service_request_id")?;
                Ok((u64::try_from(id).unwrap_or(0), column(r, "external_token")?))
            })
            .collect()
    }

    /// The CRM's number for a ticket it had answered with a token.
    pub(crate) async fn crm_resolved(&self, ticket: u64, id: &str) -> Result<(), StoreError> {
        sqlx::query(&db::sql(
            self.pool(),
            "UPDATE tickets SET external_id = ? WHERE service_request_id = ?",
        ))
        .bind(id)
        .bind(i64::try_from(ticket).unwrap_or(0))
        .execute(self.pool())
        .await
        .map_err(|e| fail("crm_resolved", e))?;
        Ok(())
    }

    /// What the CRM says of ticket `ticket` now: its status, notes and expected date are
    /// taken when any differs from ours (`updated_datetime` moves, `request.updated` goes to
    /// the webhooks, in one transaction). The ticket as changed, or `None` if nothing did.
    pub(crate) async fn crm_update(
        &self,
        ticket: u64,
        status: crate::dispatch::tickets::Status,
        notes: Option<&str>,
        expected: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Option<Ticket>, StoreError> {
        let now = crate::dispatch::tickets::iso(crate::dispatch::tickets::whole_second_utc(now))?;
        // What a CRM wrote, stored as any ticket text is (a NUL cannot be, on PostgreSQL).
        let notes = notes.map(crate::dispatch::tickets::without_nul);
        let notes = notes.as_deref();
        let expected = expected.map(crate::dispatch::tickets::without_nul);
        let expected = expected.as_deref();
        let sql = format!(
            "UPDATE tickets SET status = ?, status_notes = ?, expected_datetime = ?, \
             updated_datetime = {greatest}(?, updated_datetime) \
             WHERE service_request_id = ? AND (status IS DISTINCT FROM ? \
             OR status_notes IS DISTINCT FROM ? OR expected_datetime IS DISTINCT FROM ?) \
             RETURNING {TICKET_COLUMNS}",
            greatest = db::greatest(self.pool()),
        );
        let id = i64::try_from(ticket).unwrap_or(0);
        let mut tx = WriteTxn::begin(self.pool())
            .await
            .map_err(|e| fail("crm_update", e))?;
        let row = sqlx::query(&db::sql(tx.conn(), &sql))
            .bind(status.as_str())
            .bind(notes)
            .bind(expected)
            .bind(&now)
            .bind(id)
            .bind(status.as_str())
            .bind(notes)
            .bind(expected)
            .fetch_optional(tx.conn())
            .await;
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                tx.rollback().await;
                return Err(fail("crm_update", e));
            }
        };
        let Some(t) = row.as_ref().map(ticket_from_row).transpose()? else {
            tx.rollback().await;
            return Ok(None);
        };
        if let Err(e) = self
            .outbox
            .ticket_event(tx.conn(), Event::RequestUpdated, &t)
            .await
        {
            tx.rollback().await;
            return Err(fail("crm_update", e));
        }
        tx.commit().await.map_err(|e| fail("crm_update", e))?;
        if self.outbox.wants(Event::RequestUpdated) {
            self.outbox_wake.notify_one();
        }
        tracing::info!(
            service_request_id = ticket,
            status = %status,
            "ticket status updated from the CRM"
        );
        Ok(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::tickets::{NewTicket, Status};

    fn pothole() -> NewTicket {
        NewTicket {
            service_code: "pothole".into(),
            service_name: "Pothole".into(),
            phone: Some("+12125550100".into()),
            ..NewTicket::default()
        }
    }

    fn plan() -> OutboxPlan {
        OutboxPlan {
            open311: true,
            webhooks: vec![WebhookPlan {
                url: "http://127.0.0.1:9/hook".into(),
                events: vec![Event::RequestCreated, Event::RequestUpdated],
                fields: vec!["service_request_id".into(), "status".into()],
            }],
        }
    }

    async fn store() -> TicketStore {
        TicketStore::open_in_memory()
            .await
            .unwrap()
            .with_outbox(plan())
    }

    #[tokio::test]
    async fn a_ticket_and_what_it_owes_commit_together() {
        let store = store().await;
        let t = store.file(pothole()).await.unwrap();
        let rows = store.outbox_list(None, 10).await.unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let crm = rows.iter().find(|r| r.kind == Kind::Open311).unwrap();
        let id = t.service_request_id.to_string();
        assert_eq!(crm.service_request_id.as_deref(), Some(id.as_str()));
        assert_eq!(
            (crm.state.as_str(), crm.event.as_str()),
            ("pending", "request.created")
        );
        // The webhook body carries only the fields asked for.
        let items = store.outbox_claim(i64::MAX, 10).await.unwrap();
        let hook = items.iter().find(|i| i.kind == Kind::Webhook).unwrap();
        let body: serde_json::Value = serde_json::from_str(hook.body.as_deref().unwrap()).unwrap();
        assert_eq!(body["event"], "request.created");
        assert_eq!(
            body["request"],
            serde_json::json!({"service_request_id": id, "status": "open"})
        );
        assert!(!hook.body.as_deref().unwrap().contains("2125550100"));

        // A ticket the database refuses leaves nothing owed behind.
        let before = store.outbox_list(None, 10).await.unwrap().len();
        let bad = NewTicket {
            lat: Some(91.0),
            long: Some(0.0),
            ..pothole()
        };
        assert!(store.file(bad).await.is_err());
        assert_eq!(store.outbox_list(None, 10).await.unwrap().len(), before);

        // A status change owes request.updated; without webhooks for it, nothing.
        store
            .update_status(t.service_request_id, Status::Closed, Some("done"))
            .await
            .unwrap();
        let updated = store.outbox_list(Some("pending"), 10).await.unwrap();
        assert_eq!(updated.len(), 1, "{updated:?}");
        assert_eq!(updated[0].event, "request.updated");
    }

    #[tokio::test]
    async fn an_acknowledged_request_is_never_sent_again_and_an_interrupted_one_waits_for_an_admin()
    {
        let store = store().await;
        let a = store.file(pothole()).await.unwrap();
        let b = store.file(pothole()).await.unwrap();
        let claimed = store.outbox_claim(i64::MAX, 10).await.unwrap();
        assert_eq!(claimed.len(), 4);
        assert!(claimed.iter().all(|i| i.attempts == 1));
        assert!(store.outbox_claim(i64::MAX, 10).await.unwrap().is_empty());
        let crm_a = claimed
            .iter()
            .find(|i| i.kind == Kind::Open311 && i.ticket_id == Some(a.service_request_id))
            .unwrap();
        store
            .outbox_crm_done(crm_a.id, a.service_request_id, &Ack::Id("638344".into()), 5)
            .await
            .unwrap();
        let got = store.get(a.service_request_id).await.unwrap().unwrap();
        assert_eq!(got.external_id.as_deref(), Some("638344"));

        // A stop mid-send: b's CRM request is dead-lettered, its webhook sent again, a's done
        // request stays done.
        assert_eq!(store.outbox_recover().await.unwrap(), (2, 1));
        let dead = store.outbox_list(Some("dead"), 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        let b_id = b.service_request_id.to_string();
        assert_eq!(dead[0].service_request_id.as_deref(), Some(b_id.as_str()));
        assert_eq!(dead[0].last_error.as_deref(), Some(INTERRUPTED));
        let again = store.outbox_claim(i64::MAX, 10).await.unwrap();
        assert_eq!(again.len(), 2);
        assert!(again
            .iter()
            .all(|i| i.kind == Kind::Webhook && i.attempts == 2));

        // A second CRM row for a ticket cannot exist.
        let mut conn = store.pool().acquire().await.unwrap();
        let dup = OutboxPlan {
            open311: true,
            webhooks: Vec::new(),
        }
        .ticket_filed(&mut conn, &got, OffsetDateTime::now_utc())
        .await;
        assert!(dup.is_err(), "one CRM request per ticket");
        drop(conn);

        // The admin checks the CRM and sends b again.
        assert!(store.outbox_revive(dead[0].id, 7).await.unwrap());
        assert!(!store.outbox_revive(dead[0].id, 7).await.unwrap());
        let revived = store.outbox_claim(7, 10).await.unwrap();
        assert_eq!(revived.len(), 1);
        assert_eq!((revived[0].kind, revived[0].attempts), (Kind::Open311, 1));
        let stats = store.outbox_stats().await.unwrap();
        assert_eq!((stats.depth, stats.dead), (3, 0));
    }

    #[tokio::test]
    async fn an_emergency_redirect_tells_its_webhook_where_and_how_never_who_called() {
        let store = TicketStore::open_in_memory()
            .await
            .unwrap()
            .with_outbox(OutboxPlan {
                open311: false,
                webhooks: vec![WebhookPlan {
                    url: "http://127.0.0.1:9/hook".into(),
                    events: vec![Event::EmergencyRedirected],
                    fields: Vec::new(),
                }],
            });
        let audit = crate::dispatch::tickets::EmergencyAudit {
            caller: Some("+12125550100".into()),
            call_id: "call-1".into(),
            menu_path: "main>9".into(),
            method: "refer".into(),
            ..Default::default()
        };
        let id = store.audit_emergency_start(&audit).await.unwrap();
        assert_eq!(store.emergency_audits(1).await.unwrap()[0].id, id);
        // A ticket is not what this webhook asked for.
        store.file(pothole()).await.unwrap();
        let items = store.outbox_claim(i64::MAX, 10).await.unwrap();
        assert_eq!(items.len(), 1, "{items:?}");
        assert_eq!(items[0].event, Event::EmergencyRedirected);
        let body = items[0].body.as_deref().unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["redirect"]["menu_path"], "main>9");
        assert_eq!(v["redirect"]["method"], "refer");
        assert!(!body.contains("2125550100"), "{body}");
    }

    #[tokio::test]
    async fn the_crms_status_is_taken_only_when_it_changed() {
        let store = store().await;
        let t = store.file(pothole()).await.unwrap();
        let id = t.service_request_id;
        let now = OffsetDateTime::now_utc();
        assert!(store
            .crm_update(id, Status::Open, None, None, now)
            .await
            .unwrap()
            .is_none());
        let changed = store
            .crm_update(
                id,
                Status::Closed,
                Some("Filled by crew 7"),
                Some("2026-12-09T13:00:00Z"),
                now,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(changed.status, Status::Closed);
        assert_eq!(changed.status_notes.as_deref(), Some("Filled by crew 7"));
        assert_eq!(
            changed.expected_datetime,
            Some(time::macros::datetime!(2026-12-09 13:00:00 UTC))
        );
        assert!(store
            .crm_update(
                id,
                Status::Closed,
                Some("Filled by crew 7"),
                Some("2026-12-09T13:00:00Z"),
                now
            )
            .await
            .unwrap()
            .is_none());
    }
}
