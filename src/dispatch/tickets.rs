//! The ticket store: 311 service requests and the emergency-redirect audit, in SQLite.
//!
//! One [`TicketStore`] (cheap to clone: it is a connection pool) is shared by the call
//! flow, which files tickets and audits emergency transfers, and the HTTP API, which lists
//! and updates them.
//!
//! # Guarantees
//!
//! * **Durable before spoken.** The database runs in WAL mode with `synchronous=FULL`, and
//!   [`TicketStore::file`] and [`TicketStore::audit_emergency_start`] return only after
//!   their single-statement transaction has committed, so a ticket number read to a caller
//!   survives a crash or power cut.
//! * **No caller input in SQL text.** Every value is bound as a parameter; the only
//!   dynamic SQL is the number of `?` placeholders in [`TicketStore::list`].
//! * **Phone-friendly numbers.** `service_request_id` is 8 random digits
//!   ([`ID_MIN`]..=[`ID_MAX`], never a leading 0), retried on collision.
//! * **Times.** Stored and serialised as ISO 8601 UTC with whole seconds
//!   (`2026-11-26T03:22:09Z`), so text order is time order; query bounds are compared at
//!   one-second granularity, both ends inclusive.
//!
//! # Errors
//!
//! [`StoreError::is_transient`] separates "the disk is busy, full or read-only right now"
//! (the caller hears an apology and is offered the operator) from bugs and corruption.
//! [`TicketStore::set_read_only`] and [`TicketStore::set_max_pages`] put a running store in
//! those states on purpose (a maintenance window, a size cap, a fault drill).
//!
//! Schema: `migrations/` at the crate root, embedded with [`sqlx::migrate!`] and run by
//! [`TicketStore::open`].

use crate::dispatch::db::{self, Dialect, HasDialect};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::MigrateError;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions, Row};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Smallest ticket number: 8 digits, no leading zero.
pub(crate) const ID_MIN: u64 = 10_000_000;
/// Largest ticket number.
pub(crate) const ID_MAX: u64 = 99_999_999;
/// How many random numbers [`TicketStore::file`] tries before giving up.
pub(crate) const ID_ATTEMPTS: u32 = 32;
/// Rows returned by [`TicketStore::list`] when [`TicketQuery::limit`] is `None`.
pub(crate) const DEFAULT_LIST_LIMIT: u32 = 1000;
/// Most service codes [`TicketStore::list`] merges from one index walk each; more go in one
/// `IN (...)`.
pub(crate) const MERGED_CODES: usize = 16;
/// Most `ids` plus `service_codes` one [`TicketQuery`] may carry.
pub(crate) const MAX_FILTER_VALUES: usize = 1000;
/// How long a statement waits for another writer's lock before failing with
/// [`StoreError::Busy`].
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections in the pool of a file database.
pub(crate) const MAX_CONNECTIONS: u32 = 4;
/// Connections in the pool of a PostgreSQL database, per node.
pub(crate) const POSTGRES_CONNECTIONS: u32 = 8;
/// The longest a statement may run on PostgreSQL before the server cancels it.
pub(crate) const POSTGRES_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a query waits for a free pooled connection before [`StoreError::PoolTimeout`].
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// SQLite's largest `max_page_count` (its default): no cap.
const SQLITE_MAX_PAGES: u64 = 4_294_967_294;

// SQLite primary result codes (the low byte of an extended code).
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_READONLY: i32 = 8;
const SQLITE_FULL: i32 = 13;

/// Everything the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created (missing directory, permissions,
    /// not a database, or the WAL/pragma setup failed).
    #[error("cannot open ticket database {}: {source}", path.display())]
    Open {
        /// The file that was being opened.
        path: PathBuf,
        /// What SQLite or sqlx said.
        source: sqlx::Error,
    },
    /// Applying the embedded migrations failed (or the database was migrated by a newer,
    /// different build).
    #[error("ticket database migration failed: {0}")]
    Migrate(#[from] MigrateError),
    /// Another connection or process holds the lock past [`BUSY_TIMEOUT`]
    /// (`SQLITE_BUSY`, `SQLITE_LOCKED` and their extended codes). Transient.
    #[error("ticket database is busy (locked): {0}")]
    Busy(#[source] sqlx::Error),
    /// The disk or the database's size limit is full (`SQLITE_FULL`). Transient.
    #[error("ticket database is full: {0}")]
    Full(#[source] sqlx::Error),
    /// The database or its file system is read-only (`SQLITE_READONLY`). Transient.
    #[error("ticket database is read-only: {0}")]
    ReadOnly(#[source] sqlx::Error),
    /// The database server cannot be reached or went away (PostgreSQL down, restarting,
    /// or the network to it lost). Transient.
    #[error("ticket database is unreachable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// No pooled connection came free within [`ACQUIRE_TIMEOUT`]. Transient.
    #[error("no ticket database connection free within {ACQUIRE_TIMEOUT:?}")]
    PoolTimeout,
    /// [`ID_ATTEMPTS`] random ticket numbers in a row were already taken.
    #[error("no free ticket number after {attempts} attempts")]
    NoFreeId {
        /// How many numbers were tried.
        attempts: u32,
    },
    /// `lat`/`long` are not finite, not within ±90/±180, or only one of them is given.
    #[error("invalid coordinates lat={lat:?} long={long:?}")]
    InvalidCoordinates {
        /// The latitude given.
        lat: Option<f64>,
        /// The longitude given.
        long: Option<f64>,
    },
    /// A [`TicketQuery`] carries more than [`MAX_FILTER_VALUES`] ids and service codes.
    #[error("{count} filter values in one query, at most {MAX_FILTER_VALUES} allowed")]
    TooManyFilterValues {
        /// `ids.len() + service_codes.len()`.
        count: usize,
    },
    /// A datetime cannot be written as ISO 8601 (year outside 0000–9999).
    #[error("datetime cannot be written as ISO 8601: {0}")]
    InvalidDatetime(#[from] time::error::Format),
    /// [`TicketStore::audit_emergency_outcome`] named an audit row that does not exist.
    #[error("no emergency audit row {id}")]
    NoSuchAudit {
        /// The row id asked for.
        id: i64,
    },
    /// A stored row holds a value this build cannot read (corruption or a hand edit).
    #[error("stored {column} is unreadable: {value}")]
    BadRow {
        /// The column.
        column: &'static str,
        /// The value found, or the decode error.
        value: String,
    },
    /// What this database cannot do (a SQLite-only control on PostgreSQL).
    #[error("the ticket database cannot do this: {0}")]
    Unsupported(&'static str),
    /// Any other database error (SQL error, I/O error, corruption, pool closed).
    #[error("ticket database error: {0}")]
    Db(#[source] sqlx::Error),
}

impl StoreError {
    /// True when retrying later may succeed: busy/locked, disk full, read-only, pool
    /// exhausted. The caller should hear an apology and be offered the operator.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Busy(_)
                | StoreError::Full(_)
                | StoreError::ReadOnly(_)
                | StoreError::PoolTimeout
                | StoreError::Unavailable(_)
        )
    }
}

/// The primary SQLite result code of a database error, if it is one.
fn sqlite_code(e: &sqlx::Error) -> Option<i32> {
    match e {
        sqlx::Error::Database(db)
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() =>
        {
            db.code().and_then(|c| c.parse::<i32>().ok())
        }
        _ => None,
    }
}

/// The SQLSTATE of a PostgreSQL error, if it is one.
fn postgres_state(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .map(|pg| pg.code().to_owned()),
        _ => None,
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => return StoreError::PoolTimeout,
            // A database server that is down, restarting or unreachable (PostgreSQL; an
            // embedded SQLite file never fails this way).
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => {
                return StoreError::Unavailable(e)
            }
            _ => {}
        }
        if let Some(state) = postgres_state(&e) {
            return match state.as_str() {
                // serialization_failure, deadlock_detected, lock_not_available
                "40001" | "40P01" | "55P03" => StoreError::Busy(e),
                // disk_full, insufficient_resources, out_of_memory
                "53100" | "53000" | "53200" => StoreError::Full(e),
                // read_only_sql_transaction (a standby, or `set_read_only`)
                "25006" => StoreError::ReadOnly(e),
                // connection exceptions, admin/crash shutdown, cannot connect now
                s if s.starts_with("08") || s.starts_with("57P") => StoreError::Unavailable(e),
                _ => StoreError::Db(e),
            };
        }
        match sqlite_code(&e).map(|c| c & 0xff) {
            Some(SQLITE_BUSY | SQLITE_LOCKED) => StoreError::Busy(e),
            Some(SQLITE_FULL) => StoreError::Full(e),
            Some(SQLITE_READONLY) => StoreError::ReadOnly(e),
            _ => StoreError::Db(e),
        }
    }
}

/// Logs a failed operation (transient ones as warnings) and converts it.
pub(crate) fn fail(op: &'static str, e: sqlx::Error) -> StoreError {
    let e = StoreError::from(e);
    if e.is_transient() {
        tracing::warn!(op, error = %e, "ticket store unavailable");
    } else {
        tracing::error!(op, error = %e, "ticket store failed");
    }
    e
}

/// A write transaction on a connection of its own: `BEGIN IMMEDIATE` (the write lock at once,
/// waiting at most the busy timeout), then [`commit`](Self::commit) or
/// [`rollback`](Self::rollback).
///
/// On PostgreSQL the transaction starts with `BEGIN` and [`db::lock_writes`], so writes run
/// one at a time across every node as SQLite's write lock makes them run in one file.
///
/// Not sqlx's `Transaction`: sqlx counts the transactions it opened on each connection, and
/// when SQLite ends one by itself (it rolls the whole transaction back on `SQLITE_FULL` and on
/// some I/O errors) sqlx's count no longer matches. Its next `begin()` on that connection is
/// then a `SAVEPOINT`, which opens a transaction that its rollback (`ROLLBACK TO`) never
/// closes: an idle pooled connection keeps the write lock, and every other write, ours and
/// other processes', gets `SQLITE_BUSY` until the server restarts. Here the statements are
/// plain, and a connection whose transaction may still be open after an error is closed,
/// not returned to the pool (closing a connection rolls back whatever it had open).
pub(crate) struct WriteTxn {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
}

impl WriteTxn {
    pub(crate) async fn begin(pool: &AnyPool) -> Result<WriteTxn, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        match conn.dialect() {
            Dialect::Sqlite => {
                sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
            }
            Dialect::Postgres => {
                sqlx::query("BEGIN").execute(&mut *conn).await?;
                let mut txn = WriteTxn { conn: Some(conn) };
                db::lock_writes(txn.conn()).await?;
                return Ok(txn);
            }
        }
        Ok(WriteTxn { conn: Some(conn) })
    }

    pub(crate) fn conn(&mut self) -> &mut sqlx::AnyConnection {
        match self.conn.as_mut() {
            Some(c) => c,
            None => unreachable!("a WriteTxn has its connection until it ends"),
        }
    }

    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        let done = sqlx::query("COMMIT").execute(self.conn()).await;
        if done.is_ok() {
            self.conn.take(); // back to the pool, with no transaction open
        }
        done.map(drop)
    }

    /// Rolls back. When SQLite refuses (it may have rolled back by itself already), the
    /// connection is closed, which rolls back whatever it still had: either way nothing is
    /// kept and no lock is held after this.
    pub(crate) async fn rollback(mut self) {
        if sqlx::query("ROLLBACK").execute(self.conn()).await.is_ok() {
            self.conn.take();
        }
    }
}

impl Drop for WriteTxn {
    /// Ended without commit or rollback, or either failed: the connection may still hold the
    /// transaction, so it leaves the pool and is closed.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

/// A ticket's state (Open311 `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Filed and not yet resolved.
    Open,
    /// Resolved or rejected.
    Closed,
}

impl Status {
    /// The stored and Open311 spelling: `open` or `closed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Closed => "closed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a known [`Status`] or [`Channel`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownValue {
    /// `status` or `channel`.
    pub kind: &'static str,
    /// The string given.
    pub(crate) value: String,
}

impl FromStr for Status {
    type Err = UnknownValue;
    /// Parses `open` or `closed` (exact, lower case, as Open311 spells them).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Status::Open),
            "closed" => Ok(Status::Closed),
            _ => Err(UnknownValue {
                kind: "status",
                value: s.to_owned(),
            }),
        }
    }
}

/// How a ticket reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Filed from a call to the IVR.
    #[default]
    Phone,
    /// Filed through the HTTP API (Open311 POST).
    Web,
    /// Filed by an operator from the console (`agent_id` says who).
    Operator,
}

impl Channel {
    /// The stored spelling: `phone`, `web` or `operator`.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Phone => "phone",
            Channel::Web => "web",
            Channel::Operator => "operator",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Channel {
    type Err = UnknownValue;
    /// Parses `phone`, `web` or `operator`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "phone" => Ok(Channel::Phone),
            "web" => Ok(Channel::Web),
            "operator" => Ok(Channel::Operator),
            _ => Err(UnknownValue {
                kind: "channel",
                value: s.to_owned(),
            }),
        }
    }
}

/// What a caller or web client gives to file a ticket. The store adds the number, the
/// `open` status and the timestamps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewTicket {
    /// Open311 `service_code` of the menu leaf / service definition.
    pub service_code: String,
    /// Human name of the service, as of filing.
    pub service_name: String,
    pub description: Option<String>,
    pub agency_responsible: Option<String>,
    /// Open311 `service_notice`, e.g. "expect a visit within 5 business days".
    pub service_notice: Option<String>,
    pub zipcode: Option<String>,
    /// The house number a caller keyed on the phone (services with `house_number: true`).
    pub house_number: Option<String>,
    pub address: Option<String>,
    pub address_id: Option<String>,
    /// WGS84 latitude, −90..=90; given together with `long` or not at all.
    pub lat: Option<f64>,
    /// WGS84 longitude, −180..=180.
    pub long: Option<f64>,
    /// Caller's number (from SIP or keyed in). Personal data.
    pub phone: Option<String>,
    /// Personal data.
    pub email: Option<String>,
    /// Personal data.
    pub first_name: Option<String>,
    /// Personal data.
    pub last_name: Option<String>,
    /// Media a web client posted with the request (an absolute http(s) URL). Public.
    pub media_url: Option<String>,
    /// The caller's recorded description: a file name in `storage.recordings_dir`. Personal
    /// data, served only through the admin API.
    pub recording: Option<String>,
    pub channel: Channel,
    /// Language of the call or request, e.g. `en`, `es`.
    pub language: Option<String>,
    /// SIP Call-ID of the call that filed it.
    pub call_id: Option<String>,
    /// The caller asked to be called back.
    pub callback_requested: bool,
    /// The operator who filed it (channel `operator`).
    pub agent_id: Option<String>,
}

/// A stored ticket. Serialises with the Open311 GeoReport v2 field names, plus our
/// extras (`phone`, `email`, `first_name`, `last_name`, `channel`, `language`, `call_id`,
/// `callback_requested`).
///
/// The extras include personal data: a public Open311 `GET service_requests` response
/// should not serialise this struct as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    /// 8 digits, [`ID_MIN`]..=[`ID_MAX`].
    pub service_request_id: u64,
    pub status: Status,
    pub status_notes: Option<String>,
    pub service_name: String,
    pub service_code: String,
    pub description: Option<String>,
    pub agency_responsible: Option<String>,
    pub service_notice: Option<String>,
    /// When it was filed, UTC, whole seconds.
    #[serde(with = "time::serde::rfc3339")]
    pub requested_datetime: OffsetDateTime,
    /// Last change (filing or status update), UTC, whole seconds.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_datetime: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expected_datetime: Option<OffsetDateTime>,
    pub address: Option<String>,
    pub address_id: Option<String>,
    pub zipcode: Option<String>,
    /// The house number a caller keyed on the phone; `address` then reads
    /// `"<house number>, ZIP <zip>"`.
    #[serde(default)]
    pub house_number: Option<String>,
    pub lat: Option<f64>,
    pub long: Option<f64>,
    pub media_url: Option<String>,
    /// The caller's recording (file name in `storage.recordings_dir`). Personal data.
    pub recording: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub channel: Channel,
    pub language: Option<String>,
    pub call_id: Option<String>,
    pub callback_requested: bool,
    /// The transfer that took the call that filed it on to someone else (`transferred to
    /// crisis by 1001 (refer)`). Private: staff only, never in Open311 output.
    #[serde(default)]
    pub transfer: Option<String>,
    /// The operator who filed it (channel `operator`).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// The city CRM's number for this request (its `service_request_id`), once the outbox
    /// has delivered it to `forward.open311` (see [`crate::forward`]).
    #[serde(default)]
    pub external_id: Option<String>,
    /// Callers who reported the same open problem later and were added to this request
    /// instead of filing another ([`TicketStore::add_duplicate`]). Public: Open311 shows it.
    #[serde(default)]
    pub duplicates: u32,
}

/// What Open311 publishes of a ticket: the GeoReport v2 fields and our public extensions,
/// nothing personal (no caller, no recording, no call). [`TicketStore::list_public`] reads
/// only these columns, so a public list never reads a caller's number.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicTicket {
    pub service_request_id: u64,
    pub status: Status,
    pub status_notes: Option<String>,
    pub service_name: String,
    pub service_code: String,
    pub description: Option<String>,
    pub agency_responsible: Option<String>,
    pub service_notice: Option<String>,
    pub requested_datetime: OffsetDateTime,
    pub updated_datetime: OffsetDateTime,
    pub expected_datetime: Option<OffsetDateTime>,
    pub address: Option<String>,
    pub address_id: Option<String>,
    pub zipcode: Option<String>,
    pub lat: Option<f64>,
    pub long: Option<f64>,
    /// As stored: Open311 shows only a client's absolute http(s) URL.
    pub media_url: Option<String>,
    pub external_id: Option<String>,
    pub duplicates: u32,
}

impl From<Ticket> for PublicTicket {
    fn from(t: Ticket) -> PublicTicket {
        PublicTicket {
            service_request_id: t.service_request_id,
            status: t.status,
            status_notes: t.status_notes,
            service_name: t.service_name,
            service_code: t.service_code,
            description: t.description,
            agency_responsible: t.agency_responsible,
            service_notice: t.service_notice,
            requested_datetime: t.requested_datetime,
            updated_datetime: t.updated_datetime,
            expected_datetime: t.expected_datetime,
            address: t.address,
            address_id: t.address_id,
            zipcode: t.zipcode,
            lat: t.lat,
            long: t.long,
            media_url: t.media_url,
            external_id: t.external_id,
            duplicates: t.duplicates,
        }
    }
}

/// The start of a transfer, for the call's record ([`TicketStore::record_transfer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRecord {
    pub id: u64,
    pub call_id: String,
    /// The operator who asked (`None`: an admin, with no operator on the call).
    pub operator: Option<String>,
    /// `911`, a `transfers` name, `agent:<id>` or `queue:<name>`.
    pub target: String,
    /// `refer`, `phone_call`, `admin` or `console`.
    pub requested_via: String,
}

/// One transfer of a call, as its record keeps it ([`TicketStore::transfers_of`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransferRow {
    pub target: String,
    pub operator: Option<String>,
    pub requested_via: String,
    pub outcome: String,
}

/// Filters for [`TicketStore::list`]; all given filters must match. The default lists the
/// newest [`DEFAULT_LIST_LIMIT`] tickets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TicketQuery {
    /// Only these numbers (any of them), if not empty.
    pub ids: Vec<u64>,
    /// Only these service codes (any of them), if not empty.
    pub service_codes: Vec<String>,
    pub status: Option<Status>,
    /// `requested_datetime >= start` (to the second).
    pub start: Option<OffsetDateTime>,
    /// `requested_datetime <= end` (to the second).
    pub end: Option<OffsetDateTime>,
    /// At most this many rows; `None` means [`DEFAULT_LIST_LIMIT`].
    pub limit: Option<u32>,
}

/// What the call flow records just before it starts an emergency transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EmergencyAudit {
    /// Caller's number, if known.
    pub(crate) caller: Option<String>,
    /// SIP Call-ID.
    pub(crate) call_id: String,
    /// Keys and menu nodes that led here, e.g. `main>1>emergency`.
    pub(crate) menu_path: String,
    /// Why (screening answer, keyword, operator), if known.
    pub(crate) reason: Option<String>,
    /// How the caller is sent on, e.g. `refer`, `bridge`, `announce`.
    pub(crate) method: String,
    /// `caller` was asserted by a trusted trunk (P-Asserted-Identity from `trunks.allow`);
    /// false: only claimed (From), and nothing the bridge asserted to 911.
    pub(crate) caller_verified: bool,
    /// The operator (agent id) who sent the caller to 911; `None` for the menu's redirects.
    pub(crate) operator: Option<String>,
    /// How the operator asked: `refer` (their phone's transfer), `phone_call` (they dialled
    /// 911 from their phone), `admin` (the admin API) or `console` (the operator's console);
    /// `None` for the menu's.
    pub(crate) requested_via: Option<String>,
    /// The `transfers` entry a menu's `transfer` action sent the caller to (a crisis or
    /// utility line); `None` for 911.
    pub(crate) destination: Option<String>,
}

/// One row of the emergency-redirect audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmergencyAuditRow {
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub caller: Option<String>,
    pub call_id: String,
    pub menu_path: String,
    pub reason: Option<String>,
    pub method: String,
    /// `started`, then `connected`, `failed:<why>` or `announced`.
    pub outcome: String,
    /// Whether `caller` was asserted by a trusted trunk (`None`: a row from before this was
    /// recorded).
    pub caller_verified: Option<bool>,
    /// The operator who sent the caller to 911 (`None`: the menu did).
    pub operator: Option<String>,
    /// How the operator asked (`refer`, `phone_call`, `admin`).
    pub requested_via: Option<String>,
    /// The crisis or utility line (`transfers` entry) the menu sent the caller to; `None`:
    /// 911.
    pub destination: Option<String>,
}

/// The ticket database: a small SQLite connection pool.
#[derive(Clone)]
pub struct TicketStore {
    pool: AnyPool,
    restrictions: Arc<Restrictions>,
    /// What each change also writes to the outbox (nothing unless forwarding or webhooks
    /// are configured), and the bell that wakes the outbox worker.
    pub(crate) outbox: Arc<crate::dispatch::outbox::OutboxPlan>,
    pub(crate) outbox_wake: Arc<tokio::sync::Notify>,
}

/// Write restrictions every connection of the pool carries, including ones opened later.
#[derive(Debug, Default)]
struct Restrictions {
    /// `PRAGMA query_only`.
    read_only: AtomicBool,
    /// `PRAGMA max_page_count`; 0 for none.
    max_pages: AtomicU64,
}

impl Restrictions {
    fn any(&self) -> bool {
        self.read_only.load(Ordering::Relaxed) || self.max_pages.load(Ordering::Relaxed) != 0
    }

    /// Applies the restrictions to one connection; returns the page cap now in force.
    /// PostgreSQL has no page cap: there a write mode is all it carries (the cap is refused
    /// earlier, by [`TicketStore::set_max_pages`]).
    async fn apply(&self, conn: &mut sqlx::AnyConnection) -> Result<u64, sqlx::Error> {
        let read_only = self.read_only.load(Ordering::Relaxed);
        if conn.dialect() == Dialect::Postgres {
            sqlx::query(if read_only {
                "SET default_transaction_read_only = on"
            } else {
                "SET default_transaction_read_only = off"
            })
            .execute(&mut *conn)
            .await?;
            return Ok(0);
        }
        sqlx::query(if read_only {
            "PRAGMA query_only = ON"
        } else {
            "PRAGMA query_only = OFF"
        })
        .execute(&mut *conn)
        .await?;
        let pages = match self.max_pages.load(Ordering::Relaxed) {
            0 => SQLITE_MAX_PAGES,
            n => n,
        };
        // PRAGMA takes no bound parameters; `pages` is a number, never caller input.
        let cap: i64 = sqlx::query_scalar(&format!("PRAGMA max_page_count = {pages}"))
            .fetch_one(&mut *conn)
            .await?;
        Ok(u64::try_from(cap).unwrap_or(0))
    }
}

impl fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketStore")
            .field("connections", &self.pool.size())
            .finish()
    }
}

pub(crate) const TICKET_COLUMNS: &str = "service_request_id, service_code, service_name, status, \
    status_notes, description, agency_responsible, service_notice, requested_datetime, \
    updated_datetime, expected_datetime, zipcode, address, address_id, lat, long, phone, \
    email, first_name, last_name, media_url, recording, channel, language, call_id, \
    callback_requested, transfer, agent_id, external_id, house_number, duplicates";

/// The columns of a [`PublicTicket`], in the order [`public_from_row`] reads them.
const PUBLIC_COLUMNS: &str = "service_request_id, service_code, service_name, status, \
    status_notes, description, agency_responsible, service_notice, requested_datetime, \
    updated_datetime, expected_datetime, zipcode, address, address_id, lat, long, media_url, \
    external_id, duplicates";

const AUDIT_COLUMNS: &str = "id, at, caller, call_id, menu_path, reason, method, outcome, \
    caller_verified, operator, requested_via, destination";

/// The window `callback.per_number_per_day` counts over.
pub(crate) const CALLBACK_WINDOW: time::Duration = time::Duration::DAY;

impl TicketStore {
    /// Opens the store and applies the migrations: the SQLite file at `path` (created if
    /// missing), or, when `path` is a `postgres://` (or `postgresql://`) URL, that PostgreSQL
    /// database (see [`TicketStore::open_postgres`]).
    pub async fn open(path: &Path) -> Result<TicketStore, StoreError> {
        if let Some(url) = path
            .to_str()
            .filter(|p| Dialect::of_url(p) == Some(Dialect::Postgres))
        {
            return TicketStore::open_postgres(url).await;
        }
        db::install_drivers();
        let url = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .to_url_lossy();
        let options = AnyConnectOptions::from_url(&url)
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?
            .disable_statement_logging();
        let restrictions = Arc::new(Restrictions::default());
        let on_connect = restrictions.clone();
        let pool = AnyPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _| {
                let r = on_connect.clone();
                Box::pin(async move {
                    // What SqliteConnectOptions would set, for a connection opened through
                    // the `Any` driver (which takes only what a URL can say).
                    for pragma in [
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = FULL",
                        "PRAGMA foreign_keys = ON",
                    ] {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                    // A number, never input.
                    let busy = format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis());
                    sqlx::query(&busy).execute(&mut *conn).await?;
                    if r.any() {
                        r.apply(conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        let store = TicketStore::migrated(pool, restrictions).await?;
        tracing::info!(path = %path.display(), "ticket store open");
        Ok(store)
    }

    /// Opens the PostgreSQL database at `url` (`postgres://user[:password]@host[:port]/db`),
    /// shared by every node, and applies the PostgreSQL migrations (under an advisory lock:
    /// nodes starting at once apply each one once). A pool of [`POSTGRES_CONNECTIONS`],
    /// each statement bounded by [`POSTGRES_STATEMENT_TIMEOUT`]; a server that cannot be
    /// reached gives [`StoreError::Unavailable`] on each use until it is back.
    pub async fn open_postgres(url: &str) -> Result<TicketStore, StoreError> {
        db::install_drivers();
        let shown = PathBuf::from(db::redacted(url));
        let options = AnyConnectOptions::from_str(url)
            .map_err(|source| StoreError::Open {
                path: shown.clone(),
                source,
            })?
            .disable_statement_logging();
        // Migrations first, on a connection of their own without the statement timeout: one
        // that builds an index over a city's years outlasts it.
        let migrating = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("SET statement_timeout = 0")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await
            .map_err(|source| StoreError::Open {
                path: shown.clone(),
                source,
            })?;
        let migrated = db::migrator(Dialect::Postgres).run(&migrating).await;
        migrating.close().await;
        migrated?;
        let restrictions = Arc::new(Restrictions::default());
        let on_connect = restrictions.clone();
        let pool = AnyPoolOptions::new()
            .max_connections(POSTGRES_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // A connection broken while idle (the server restarted) is found before use.
            .test_before_acquire(true)
            .after_connect(move |conn, _| {
                let r = on_connect.clone();
                Box::pin(async move {
                    // Numbers, never input.
                    let timeouts = [
                        format!(
                            "SET statement_timeout = {}",
                            POSTGRES_STATEMENT_TIMEOUT.as_millis()
                        ),
                        format!("SET lock_timeout = {}", BUSY_TIMEOUT.as_millis()),
                    ];
                    for set in &timeouts {
                        sqlx::query(set).execute(&mut *conn).await?;
                    }
                    if r.any() {
                        r.apply(conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: shown.clone(),
                source,
            })?;
        let store = TicketStore::migrated(pool, restrictions).await?;
        tracing::info!(database = %shown.display(), "ticket store open on PostgreSQL");
        Ok(store)
    }

    /// Opens a private in-memory database (one connection, gone when the store is
    /// dropped). For tests.
    ///
    /// With `IVR311_TEST_PG` set to a PostgreSQL server's URL (`postgres://user@host:port`),
    /// a fresh database on that server instead: the unit tests of everything stored then run
    /// on PostgreSQL (`scripts/test` does so with a throwaway cluster).
    #[cfg(test)]
    pub(crate) async fn open_in_memory() -> Result<TicketStore, StoreError> {
        db::install_drivers();
        if let Some(url) = TicketStore::test_postgres_database().await? {
            return TicketStore::open_postgres(&url).await;
        }
        let path = PathBuf::from(":memory:");
        // "sqlite::memory:" gets a unique shared-cache name per call.
        let options = AnyConnectOptions::from_str("sqlite::memory:")
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?
            .disable_statement_logging();
        // One connection that never retires, or the database would vanish with it.
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open { path, source })?;
        TicketStore::migrated(pool, Arc::default()).await
    }

    /// With `IVR311_TEST_PG` set, a new empty database on that server, by URL.
    #[cfg(test)]
    pub(crate) async fn test_postgres_database() -> Result<Option<String>, StoreError> {
        use sqlx::Connection;
        let Ok(server) = std::env::var("IVR311_TEST_PG") else {
            return Ok(None);
        };
        let name = format!("unit_{:016x}", rand::random::<u64>());
        let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
            .await
            .map_err(|source| StoreError::Open {
                path: PathBuf::from(db::redacted(&server)),
                source,
            })?;
        // `name` is hex digits made here, never input.
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .map_err(StoreError::Db)?;
        Ok(Some(format!("{server}/{name}")))
    }

    async fn migrated(
        pool: AnyPool,
        restrictions: Arc<Restrictions>,
    ) -> Result<TicketStore, StoreError> {
        // PostgreSQL's are run by `open_postgres`, on a connection of their own.
        if pool.dialect() == Dialect::Sqlite {
            db::migrator(Dialect::Sqlite).run(&pool).await?;
        }
        Ok(TicketStore {
            pool,
            restrictions,
            outbox: Arc::default(),
            outbox_wake: Arc::default(),
        })
    }

    /// Which database the store is on.
    pub fn dialect(&self) -> Dialect {
        self.pool.dialect()
    }

    /// The same store, with every change also written to the outbox as `plan` says, in the
    /// change's own transaction.
    pub(crate) fn with_outbox(mut self, plan: crate::dispatch::outbox::OutboxPlan) -> TicketStore {
        self.outbox = Arc::new(plan);
        self
    }

    /// The database's pool, for the other tables kept in it (call history).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Makes the store read-only (`PRAGMA query_only` on every connection, including ones
    /// opened later) or writable again. While read-only, filing and updates fail with
    /// [`StoreError::ReadOnly`] and reads work: for a maintenance window (a backup copying
    /// the file) and for fault drills.
    pub async fn set_read_only(&self, on: bool) -> Result<(), StoreError> {
        self.restrictions.read_only.store(on, Ordering::Relaxed);
        self.apply_restrictions().await?;
        tracing::warn!(read_only = on, "ticket store write mode changed");
        Ok(())
    }

    /// Caps the database at `pages` pages (`PRAGMA max_page_count` on every connection; SQLite
    /// never sets it below the current size, so `Some(1)` freezes the database at its size
    /// now), or lifts the cap with `None`. A write that needs more room fails with
    /// [`StoreError::Full`], exactly as on a full disk. Returns the cap in force.
    /// SQLite only: on PostgreSQL, [`StoreError::Unsupported`].
    pub async fn set_max_pages(&self, pages: Option<u64>) -> Result<u64, StoreError> {
        if self.dialect() == Dialect::Postgres {
            return Err(StoreError::Unsupported(
                "a size cap (SQLite's max_page_count)",
            ));
        }
        self.restrictions
            .max_pages
            .store(pages.map_or(0, |p| p.max(1)), Ordering::Relaxed);
        let cap = self.apply_restrictions().await?;
        tracing::warn!(max_pages = cap, "ticket store size cap changed");
        Ok(cap)
    }

    /// Applies [`Restrictions`] to every open connection: holding as many connections as the
    /// pool may have at once means holding each of them.
    async fn apply_restrictions(&self) -> Result<u64, StoreError> {
        let mut held = Vec::new();
        let mut cap = SQLITE_MAX_PAGES;
        for _ in 0..self.pool.options().get_max_connections() {
            let mut conn = self.pool.acquire().await.map_err(|e| fail("restrict", e))?;
            cap = self
                .restrictions
                .apply(&mut conn)
                .await
                .map_err(|e| fail("restrict", e))?;
            held.push(conn);
        }
        Ok(cap)
    }

    /// Closes every connection (checkpointing the WAL); later calls fail with
    /// [`StoreError::Db`]. For an orderly shutdown.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Files a ticket under a fresh random number; it is committed (durable) when this
    /// returns.
    pub async fn file(&self, t: NewTicket) -> Result<Ticket, StoreError> {
        let mut next_id = || rand::rng().random_range(ID_MIN..=ID_MAX);
        self.file_with(t, OffsetDateTime::now_utc(), &mut next_id)
            .await
    }

    /// [`file`](Self::file) with the clock and the number source given.
    async fn file_with(
        &self,
        t: NewTicket,
        now: OffsetDateTime,
        next_id: &mut (dyn FnMut() -> u64 + Send),
    ) -> Result<Ticket, StoreError> {
        check_coordinates(t.lat, t.long)?;
        let t = t.without_nul();
        let now = whole_second_utc(now);
        let now_text = iso(now)?;
        for attempt in 1..=ID_ATTEMPTS {
            let id = next_id();
            let Ok(id_sql) = i64::try_from(id) else {
                continue;
            };
            let insert = db::sql(
                &self.pool,
                "INSERT INTO tickets (service_request_id, service_code, service_name, status, \
                 status_notes, description, agency_responsible, service_notice, \
                 requested_datetime, updated_datetime, expected_datetime, zipcode, address, \
                 address_id, lat, long, phone, email, first_name, last_name, media_url, \
                 recording, channel, language, call_id, callback_requested, agent_id, \
                 house_number) \
                 VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
                 ?, ?, ?, ?, ?, ?, ?)",
            );
            // Not kept prepared on PostgreSQL: sqlx's `Any` declares a NULL f64 as float4,
            // and a statement first prepared for a ticket without coordinates would then
            // refuse the 8-byte coordinates of the next ("incorrect binary data format").
            let query = sqlx::query(&insert)
                .persistent(self.dialect() == Dialect::Sqlite)
                .bind(id_sql)
                .bind(&t.service_code)
                .bind(&t.service_name)
                .bind(Status::Open.as_str())
                .bind(&t.description)
                .bind(&t.agency_responsible)
                .bind(&t.service_notice)
                .bind(&now_text)
                .bind(&now_text)
                .bind(&t.zipcode)
                .bind(&t.address)
                .bind(&t.address_id)
                .bind(t.lat)
                .bind(t.long)
                .bind(&t.phone)
                .bind(&t.email)
                .bind(&t.first_name)
                .bind(&t.last_name)
                .bind(&t.media_url)
                .bind(&t.recording)
                .bind(t.channel.as_str())
                .bind(&t.language)
                .bind(&t.call_id)
                .bind(i64::from(t.callback_requested))
                .bind(&t.agent_id)
                .bind(&t.house_number);
            let result = if self.outbox.is_empty() {
                query.execute(&self.pool).await.map(drop)
            } else {
                // The ticket and what it owes the CRM and the webhooks commit together.
                let mut tx = WriteTxn::begin(&self.pool)
                    .await
                    .map_err(|e| fail("file", e))?;
                match query.execute(tx.conn()).await {
                    Ok(_) => {
                        let filed = Ticket::filed(id, t.clone(), now);
                        let queued = self
                            .outbox
                            .ticket_filed(tx.conn(), &filed, now)
                            .await
                            .map_err(|e| fail("file", e));
                        if let Err(e) = queued {
                            tx.rollback().await;
                            return Err(e);
                        }
                        tx.commit().await
                    }
                    Err(e) => {
                        tx.rollback().await;
                        Err(e)
                    }
                }
            };
            match result {
                Ok(()) => {
                    tracing::info!(
                        service_request_id = id,
                        service_code = %t.service_code,
                        channel = %t.channel,
                        "ticket filed"
                    );
                    if !self.outbox.is_empty() {
                        self.outbox_wake.notify_one();
                    }
                    return Ok(Ticket::filed(id, t, now));
                }
                Err(e) if db::is_unique_violation(&e) => {
                    tracing::debug!(attempt, "ticket number taken, drawing another");
                }
                Err(e) => return Err(fail("file", e)),
            }
        }
        tracing::error!(attempts = ID_ATTEMPTS, "no free ticket number");
        Err(StoreError::NoFreeId {
            attempts: ID_ATTEMPTS,
        })
    }

    /// The ticket with this number, if any.
    pub async fn get(&self, id: u64) -> Result<Option<Ticket>, StoreError> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let sql = format!("SELECT {TICKET_COLUMNS} FROM tickets WHERE service_request_id = ?");
        let row = sqlx::query(&db::sql(&self.pool, &sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| fail("get", e))?;
        row.as_ref().map(ticket_from_row).transpose()
    }

    /// Tickets matching every filter in `q`, newest `requested_datetime` first (ties, within
    /// one second, by descending number).
    pub async fn list(&self, q: &TicketQuery) -> Result<Vec<Ticket>, StoreError> {
        let rows = self.list_rows(q, TICKET_COLUMNS).await?;
        rows.iter().map(ticket_from_row).collect()
    }

    /// [`list`](Self::list), reading only what Open311 publishes: a third fewer columns to
    /// carry from the database per row, and no caller's number among them.
    pub async fn list_public(&self, q: &TicketQuery) -> Result<Vec<PublicTicket>, StoreError> {
        let rows = self.list_rows(q, PUBLIC_COLUMNS).await?;
        rows.iter().map(public_from_row).collect()
    }

    /// The rows of [`list`](Self::list), with `columns`.
    async fn list_rows(&self, q: &TicketQuery, columns: &str) -> Result<Vec<AnyRow>, StoreError> {
        let count = q.ids.len() + q.service_codes.len();
        if count > MAX_FILTER_VALUES {
            return Err(StoreError::TooManyFilterValues { count });
        }
        // Numbers outside i64 can match nothing.
        let ids: Vec<i64> = q
            .ids
            .iter()
            .filter_map(|&id| i64::try_from(id).ok())
            .collect();
        if !q.ids.is_empty() && ids.is_empty() {
            return Ok(Vec::new());
        }
        let start = q.start.map(|t| iso(whole_second_utc(t))).transpose()?;
        let end = q.end.map(|t| iso(whole_second_utc(t))).transpose()?;
        let limit = i64::from(q.limit.unwrap_or(DEFAULT_LIST_LIMIT));
        let mut codes: Vec<String> = Vec::new();
        for code in &q.service_codes {
            let code = without_nul(code).into_owned();
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
        if ids.is_empty() && (2..=MERGED_CODES).contains(&codes.len()) {
            return (self.list_merged(columns, &codes, q.status, start, end, limit)).await;
        }

        // Only fixed fragments and placeholders go into the text.
        let mut sql = format!("SELECT {columns} FROM tickets WHERE 1 = 1");
        if !ids.is_empty() {
            sql.push_str(" AND service_request_id IN (");
            sql.push_str(&placeholders(ids.len()));
            sql.push(')');
        }
        if !q.service_codes.is_empty() {
            sql.push_str(" AND service_code IN (");
            sql.push_str(&placeholders(q.service_codes.len()));
            sql.push(')');
        }
        if q.status.is_some() {
            sql.push_str(" AND status = ?");
        }
        if start.is_some() {
            sql.push_str(" AND requested_datetime >= ?");
        }
        if end.is_some() {
            sql.push_str(" AND requested_datetime <= ?");
        }
        sql.push_str(" ORDER BY requested_datetime DESC, service_request_id DESC LIMIT ?");

        let sql = db::sql(&self.pool, &sql);
        let mut query = sqlx::query(&sql);
        for id in ids {
            query = query.bind(id);
        }
        for code in &q.service_codes {
            query = query.bind(without_nul(code).into_owned());
        }
        if let Some(status) = q.status {
            query = query.bind(status.as_str());
        }
        if let Some(start) = start {
            query = query.bind(start);
        }
        if let Some(end) = end {
            query = query.bind(end);
        }
        query = query.bind(limit);
        query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| fail("list", e))
    }

    /// [`list_rows`](Self::list_rows) for a few service codes: each code's newest `limit` from its own
    /// index, merged in date order under one `limit`. One `service_code IN (...)` lets a
    /// planner walk the date index and filter by code instead, which reads far when a code
    /// is rare (PostgreSQL does, at ten million tickets: BENCHMARKS.md).
    async fn list_merged(
        &self,
        columns: &str,
        codes: &[String],
        status: Option<Status>,
        start: Option<String>,
        end: Option<String>,
        limit: i64,
    ) -> Result<Vec<AnyRow>, StoreError> {
        // Only fixed fragments and placeholders go into the text.
        let mut branch = format!("SELECT {columns} FROM tickets WHERE service_code = ?");
        if status.is_some() {
            branch.push_str(" AND status = ?");
        }
        if start.is_some() {
            branch.push_str(" AND requested_datetime >= ?");
        }
        if end.is_some() {
            branch.push_str(" AND requested_datetime <= ?");
        }
        branch.push_str(" ORDER BY requested_datetime DESC, service_request_id DESC LIMIT ?");
        let mut sql = String::new();
        for i in 0..codes.len() {
            if i > 0 {
                sql.push_str(" UNION ALL ");
            }
            sql.push_str(&format!("SELECT * FROM ({branch}) AS code{i}"));
        }
        sql.push_str(" ORDER BY requested_datetime DESC, service_request_id DESC LIMIT ?");
        let sql = db::sql(&self.pool, &sql);
        let mut query = sqlx::query(&sql);
        for code in codes {
            query = query.bind(code.clone());
            if let Some(status) = status {
                query = query.bind(status.as_str());
            }
            if let Some(start) = &start {
                query = query.bind(start.clone());
            }
            if let Some(end) = &end {
                query = query.bind(end.clone());
            }
            query = query.bind(limit);
        }
        query = query.bind(limit);
        query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| fail("list", e))
    }

    /// The newest tickets (at most `limit`) filed for the caller's number `phone` since
    /// `since`, newest first: a caller's earlier requests, for the operator's screen.
    pub async fn by_phone(
        &self,
        phone: &str,
        since: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<Ticket>, StoreError> {
        let since = iso(whole_second_utc(since))?;
        let sql = format!(
            "SELECT {TICKET_COLUMNS} FROM tickets WHERE phone = ? AND requested_datetime >= ? \
             ORDER BY requested_datetime DESC, service_request_id DESC LIMIT ?"
        );
        let rows = sqlx::query(&db::sql(&self.pool, &sql))
            .bind(phone)
            .bind(since)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| fail("by_phone", e))?;
        rows.iter().map(ticket_from_row).collect()
    }

    /// The newest open request filed from `phone`: its number and when it was filed.
    pub async fn open_request_of(
        &self,
        phone: &str,
    ) -> Result<Option<(u64, OffsetDateTime)>, StoreError> {
        let row: Option<(i64, String)> = sqlx::query_as(&db::sql(
            &self.pool,
            "SELECT service_request_id, requested_datetime FROM tickets \
             WHERE phone = ? AND status = 'open' \
             ORDER BY requested_datetime DESC, service_request_id DESC LIMIT 1",
        ))
        .bind(phone)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| fail("open_request_of", e))?;
        row.map(|(id, at)| {
            let id = u64::try_from(id).map_err(|_| StoreError::BadRow {
                column: "service_request_id",
                value: id.to_string(),
            })?;
            Ok((id, datetime("requested_datetime", &at)?))
        })
        .transpose()
    }

    /// The newest open request of `service_code` at `zipcode` filed since `since`: a report
    /// of the same problem.
    pub async fn find_duplicate(
        &self,
        service_code: &str,
        zipcode: &str,
        since: OffsetDateTime,
    ) -> Result<Option<u64>, StoreError> {
        let since = iso(whole_second_utc(since))?;
        let id: Option<i64> = sqlx::query_scalar(&db::sql(
            &self.pool,
            "SELECT service_request_id FROM tickets \
             WHERE service_code = ? AND zipcode = ? AND status = 'open' \
             AND requested_datetime >= ? \
             ORDER BY requested_datetime DESC, service_request_id DESC LIMIT 1",
        ))
        .bind(service_code)
        .bind(zipcode)
        .bind(since)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| fail("find_duplicate", e))?;
        Ok(id.and_then(|id| u64::try_from(id).ok()))
    }

    /// Counts one more caller reporting open request `id` (its `duplicates`); false if there
    /// is no such open request.
    pub async fn add_duplicate(&self, id: u64) -> Result<bool, StoreError> {
        let Ok(id_sql) = i64::try_from(id) else {
            return Ok(false);
        };
        let done = sqlx::query(&db::sql(
            &self.pool,
            "UPDATE tickets SET duplicates = duplicates + 1 \
             WHERE service_request_id = ? AND status = 'open'",
        ))
        .bind(id_sql)
        .execute(&self.pool)
        .await
        .map_err(|e| fail("add_duplicate", e))?;
        if done.rows_affected() == 1 {
            tracing::info!(
                service_request_id = id,
                "caller added to a request as a duplicate"
            );
        }
        Ok(done.rows_affected() == 1)
    }

    /// Sets the status, and the notes when `notes` is `Some` (`None` keeps the old notes),
    /// and bumps `updated_datetime`. `None` if there is no such ticket.
    pub async fn update_status(
        &self,
        id: u64,
        status: Status,
        notes: Option<&str>,
    ) -> Result<Option<Ticket>, StoreError> {
        self.update_status_at(id, status, notes, OffsetDateTime::now_utc())
            .await
    }

    async fn update_status_at(
        &self,
        id: u64,
        status: Status,
        notes: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Option<Ticket>, StoreError> {
        let Ok(id_sql) = i64::try_from(id) else {
            return Ok(None);
        };
        let notes = notes.map(without_nul);
        let notes = notes.as_deref();
        let now = iso(whole_second_utc(now))?;
        // MAX keeps updated_datetime from going backwards if the clock does.
        let sql = format!(
            "UPDATE tickets SET status = ?, status_notes = COALESCE(?, status_notes), \
             updated_datetime = {greatest}(?, updated_datetime) \
             WHERE service_request_id = ? RETURNING {TICKET_COLUMNS}",
            greatest = db::greatest(&self.pool),
        );
        let sql = db::sql(&self.pool, &sql);
        let query = sqlx::query(&sql)
            .bind(status.as_str())
            .bind(notes)
            .bind(now)
            .bind(id_sql);
        use crate::dispatch::outbox::Event;
        if !self.outbox.wants(Event::RequestUpdated) {
            let row = query
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| fail("update_status", e))?;
            if row.is_some() {
                tracing::info!(service_request_id = id, status = %status, "ticket status updated");
            }
            return row.as_ref().map(ticket_from_row).transpose();
        }
        // The change and its webhooks commit together.
        let mut tx = WriteTxn::begin(&self.pool)
            .await
            .map_err(|e| fail("update_status", e))?;
        let row = match query.fetch_optional(tx.conn()).await {
            Ok(row) => row,
            Err(e) => {
                tx.rollback().await;
                return Err(fail("update_status", e));
            }
        };
        let Some(ticket) = row.as_ref().map(ticket_from_row).transpose()? else {
            tx.rollback().await;
            return Ok(None);
        };
        let queued = self
            .outbox
            .ticket_event(tx.conn(), Event::RequestUpdated, &ticket)
            .await;
        if let Err(e) = queued {
            tx.rollback().await;
            return Err(fail("update_status", e));
        }
        tx.commit().await.map_err(|e| fail("update_status", e))?;
        self.outbox_wake.notify_one();
        tracing::info!(service_request_id = id, status = %status, "ticket status updated");
        Ok(Some(ticket))
    }

    /// Records an emergency redirect with outcome `started`, before the transfer begins.
    /// Durable when this returns; the row id is for
    /// [`audit_emergency_outcome`](Self::audit_emergency_outcome).
    pub(crate) async fn audit_emergency_start(
        &self,
        e: &EmergencyAudit,
    ) -> Result<i64, StoreError> {
        let at = iso(whole_second_utc(OffsetDateTime::now_utc()))?;
        const INSERT: &str = "INSERT INTO emergency_redirects \
             (at, caller, call_id, menu_path, reason, method, outcome, caller_verified, \
             operator, requested_via, destination) \
             VALUES (?, ?, ?, ?, ?, ?, 'started', ?, ?, ?, ?) RETURNING id";
        let sql = db::sql(self.dialect(), INSERT);
        let text = |s: &str| without_nul(s).into_owned();
        let e = &EmergencyAudit {
            caller: e.caller.as_deref().map(text),
            call_id: text(&e.call_id),
            menu_path: text(&e.menu_path),
            reason: e.reason.as_deref().map(text),
            method: text(&e.method),
            caller_verified: e.caller_verified,
            operator: e.operator.as_deref().map(text),
            requested_via: e.requested_via.as_deref().map(text),
            destination: e.destination.as_deref().map(text),
        };
        let query = || {
            sqlx::query_scalar::<_, i64>(&sql)
                .bind(at.clone())
                .bind(e.caller.clone())
                .bind(e.call_id.clone())
                .bind(e.menu_path.clone())
                .bind(e.reason.clone())
                .bind(e.method.clone())
                .bind(i64::from(e.caller_verified))
                .bind(e.operator.clone())
                .bind(e.requested_via.clone())
                .bind(e.destination.clone())
        };
        use crate::dispatch::outbox::Event;
        let id = if self.outbox.wants(Event::EmergencyRedirected) {
            // One commit for the audit row and its webhooks: the redirect waits no longer.
            let mut tx = WriteTxn::begin(&self.pool)
                .await
                .map_err(|err| fail("audit_emergency_start", err))?;
            let id = match query().fetch_one(tx.conn()).await {
                Ok(id) => id,
                Err(err) => {
                    tx.rollback().await;
                    return Err(fail("audit_emergency_start", err));
                }
            };
            let queued = self.outbox.emergency_redirected(tx.conn(), e, &at).await;
            if let Err(err) = queued {
                tx.rollback().await;
                return Err(fail("audit_emergency_start", err));
            }
            tx.commit()
                .await
                .map_err(|err| fail("audit_emergency_start", err))?;
            self.outbox_wake.notify_one();
            id
        } else {
            query()
                .fetch_one(&self.pool)
                .await
                .map_err(|err| fail("audit_emergency_start", err))?
        };
        tracing::warn!(
            audit_id = id,
            call_id = %e.call_id,
            menu_path = %e.menu_path,
            method = %e.method,
            caller_verified = e.caller_verified,
            operator = e.operator.as_deref(),
            requested_via = e.requested_via.as_deref(),
            destination = e.destination.as_deref().unwrap_or("911"),
            "emergency redirect started"
        );
        Ok(id)
    }

    /// Takes one of `number`'s call-backs for the last 24 hours, if it has fewer than
    /// `per_day` there: true when taken (and durable), false when the number has had its
    /// call-backs. One statement decides and records, so two calls from one number at once
    /// cannot both take the last one; the count survives a restart. Rows past the window
    /// are deleted first (they count for nothing, and a number is personal data).
    pub(crate) async fn claim_callback(
        &self,
        number: &str,
        call_id: &str,
        per_day: u32,
    ) -> Result<bool, StoreError> {
        self.claim_callback_at(number, call_id, per_day, OffsetDateTime::now_utc())
            .await
    }

    async fn claim_callback_at(
        &self,
        number: &str,
        call_id: &str,
        per_day: u32,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let now = whole_second_utc(now);
        let since = iso(now - CALLBACK_WINDOW)?;
        let now = iso(now)?;
        let mut tx = WriteTxn::begin(&self.pool)
            .await
            .map_err(|e| fail("claim_callback", e))?;
        sqlx::query(&db::sql(
            tx.conn(),
            "DELETE FROM callback_requests WHERE at <= ?",
        ))
        .bind(&since)
        .execute(tx.conn())
        .await
        .map_err(|e| fail("claim_callback", e))?;
        let taken = sqlx::query(&db::sql(
            tx.conn(),
            "INSERT INTO callback_requests (number, at, call_id) \
             SELECT ?, ?, ? WHERE (SELECT COUNT(*) FROM callback_requests \
             WHERE number = ? AND at > ?) < ?",
        ))
        .bind(number)
        .bind(&now)
        .bind(call_id)
        .bind(number)
        .bind(&since)
        .bind(i64::from(per_day))
        .execute(tx.conn())
        .await
        .map_err(|e| fail("claim_callback", e))?
        .rows_affected()
            == 1;
        tx.commit().await.map_err(|e| fail("claim_callback", e))?;
        Ok(taken)
    }

    /// Sets the outcome of audit row `id`: `connected`, `failed:<why>` or `announced`.
    pub(crate) async fn audit_emergency_outcome(
        &self,
        id: i64,
        outcome: &str,
    ) -> Result<(), StoreError> {
        let result = sqlx::query(&db::sql(
            &self.pool,
            "UPDATE emergency_redirects SET outcome = ? WHERE id = ?",
        ))
        .bind(without_nul(outcome).into_owned())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| fail("audit_emergency_outcome", e))?;
        if result.rows_affected() == 0 {
            tracing::error!(audit_id = id, "emergency audit row missing");
            return Err(StoreError::NoSuchAudit { id });
        }
        tracing::info!(audit_id = id, outcome, "emergency redirect outcome");
        Ok(())
    }

    /// Records a transfer as it starts (outcome `started`), in the call's record; nothing if
    /// its outcome is written already (the two writes run side by side).
    pub async fn record_transfer(&self, t: &TransferRecord) -> Result<(), StoreError> {
        let at = iso(whole_second_utc(OffsetDateTime::now_utc()))?;
        let id = i64::try_from(t.id).map_err(|_| StoreError::BadRow {
            column: "id",
            value: t.id.to_string(),
        })?;
        sqlx::query(&db::sql(
            &self.pool,
            "INSERT INTO transfers (id, at, call_id, operator, target, requested_via, outcome) \
             VALUES (?, ?, ?, ?, ?, ?, 'started') ON CONFLICT (id) DO NOTHING",
        ))
        .bind(id)
        .bind(at)
        .bind(&t.call_id)
        .bind(&t.operator)
        .bind(&t.target)
        .bind(&t.requested_via)
        .execute(&self.pool)
        .await
        .map_err(|e| fail("record_transfer", e))?;
        Ok(())
    }

    /// Sets the outcome of transfer `t` (`connected`, `failed: ...`) and when it ended; the
    /// row is written whole if its start is not written yet, so the order in which the two
    /// writes land does not matter.
    pub async fn transfer_outcome(
        &self,
        t: &TransferRecord,
        outcome: &str,
    ) -> Result<(), StoreError> {
        let at = iso(whole_second_utc(OffsetDateTime::now_utc()))?;
        let id = i64::try_from(t.id).map_err(|_| StoreError::BadRow {
            column: "id",
            value: t.id.to_string(),
        })?;
        sqlx::query(&db::sql(&self.pool, "INSERT INTO transfers \
             (id, at, call_id, operator, target, requested_via, outcome, ended_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET outcome = excluded.outcome, ended_at = excluded.ended_at",))
        .bind(id)
        .bind(&at)
        .bind(&t.call_id)
        .bind(&t.operator)
        .bind(&t.target)
        .bind(&t.requested_via)
        .bind(outcome)
        .bind(&at)
        .execute(&self.pool)
            .await
            .map_err(|e| fail("transfer_outcome", e))?;
        Ok(())
    }

    /// The transfers of call `call_id`, oldest first.
    pub async fn transfers_of(&self, call_id: &str) -> Result<Vec<TransferRow>, StoreError> {
        let rows = sqlx::query(&db::sql(
            &self.pool,
            "SELECT target, operator, requested_via, outcome FROM transfers \
             WHERE call_id = ? ORDER BY at",
        ))
        .bind(call_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| fail("transfers_of", e))?;
        rows.iter()
            .map(|r| {
                Ok(TransferRow {
                    target: column(r, "target")?,
                    operator: column(r, "operator")?,
                    requested_via: column(r, "requested_via")?,
                    outcome: column(r, "outcome")?,
                })
            })
            .collect()
    }

    /// Note on the tickets filed by call `call_id` that it was transferred (`note`).
    pub async fn note_transfer(&self, call_id: &str, note: &str) -> Result<(), StoreError> {
        sqlx::query(&db::sql(
            &self.pool,
            "UPDATE tickets SET transfer = ? WHERE call_id = ?",
        ))
        .bind(note)
        .bind(call_id)
        .execute(&self.pool)
        .await
        .map_err(|e| fail("note_transfer", e))?;
        Ok(())
    }

    /// The newest `limit` audit rows, newest first.
    pub async fn emergency_audits(&self, limit: u32) -> Result<Vec<EmergencyAuditRow>, StoreError> {
        let sql =
            format!("SELECT {AUDIT_COLUMNS} FROM emergency_redirects ORDER BY id DESC LIMIT ?");
        let rows = sqlx::query(&db::sql(&self.pool, &sql))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| fail("emergency_audits", e))?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Checks that the database answers (`SELECT 1`).
    #[cfg(test)]
    pub(crate) async fn health(&self) -> Result<(), StoreError> {
        sqlx::query(&db::sql(&self.pool, "SELECT 1"))
            .execute(&self.pool)
            .await
            .map_err(|e| fail("health", e))?;
        Ok(())
    }

    /// Checks that a ticket could be filed now: inserts a ticket-sized row
    /// ([`PROBE_BYTES`] of description) in a transaction and rolls it back, so a read-only
    /// database, a full one (no room for another ticket) or a lock held past [`BUSY_TIMEOUT`]
    /// fails here as it would fail a caller's ticket. Nothing is kept and nothing is logged
    /// (the readiness check reports it).
    pub(crate) async fn probe_write(&self) -> Result<(), StoreError> {
        let now = iso(whole_second_utc(OffsetDateTime::now_utc()))?;
        let id = i64::try_from(rand::rng().random_range(ID_MIN..=ID_MAX)).unwrap_or(0);
        let mut tx = WriteTxn::begin(&self.pool)
            .await
            .map_err(StoreError::from)?;
        let inserted = sqlx::query(&db::sql(
            tx.conn(),
            "INSERT INTO tickets (service_request_id, service_code, service_name, status, \
             description, requested_datetime, updated_datetime, channel) \
             VALUES (?, 'readiness-probe', 'readiness probe', 'open', ?, ?, ?, 'web')",
        ))
        .bind(id)
        .bind("x".repeat(PROBE_BYTES))
        .bind(&now)
        .bind(&now)
        .execute(tx.conn())
        .await;
        tx.rollback().await;
        match inserted {
            // The number is in use: the insert got as far as the constraint, so it could write.
            Err(e) if db::is_unique_violation(&e) => Ok(()),
            Err(e) => Err(StoreError::from(e)),
            Ok(_) => Ok(()),
        }
    }
}

/// The description length of the row [`TicketStore::probe_write`] tries: about a phone
/// ticket with a long address and description.
pub(crate) const PROBE_BYTES: usize = 512;

impl Ticket {
    /// The ticket as just inserted.
    fn filed(id: u64, t: NewTicket, now: OffsetDateTime) -> Ticket {
        Ticket {
            service_request_id: id,
            status: Status::Open,
            status_notes: None,
            service_name: t.service_name,
            service_code: t.service_code,
            description: t.description,
            agency_responsible: t.agency_responsible,
            service_notice: t.service_notice,
            requested_datetime: now,
            updated_datetime: now,
            expected_datetime: None,
            address: t.address,
            address_id: t.address_id,
            zipcode: t.zipcode,
            house_number: t.house_number,
            lat: t.lat,
            long: t.long,
            media_url: t.media_url,
            recording: t.recording,
            phone: t.phone,
            email: t.email,
            first_name: t.first_name,
            last_name: t.last_name,
            channel: t.channel,
            language: t.language,
            call_id: t.call_id,
            callback_requested: t.callback_requested,
            transfer: None,
            agent_id: t.agent_id,
            external_id: None,
            duplicates: 0,
        }
    }
}

fn check_coordinates(lat: Option<f64>, long: Option<f64>) -> Result<(), StoreError> {
    let ok = match (lat, long) {
        (None, None) => true,
        (Some(la), Some(lo)) => {
            la.is_finite() && lo.is_finite() && la.abs() <= 90.0 && lo.abs() <= 180.0
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidCoordinates { lat, long })
    }
}

/// `?, ?, ?` with `n` marks.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// UTC with the fraction of a second dropped: the stored precision.
pub(crate) fn whole_second_utc(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(time::UtcOffset::UTC);
    t - time::Duration::nanoseconds(i64::from(t.nanosecond()))
}

/// `text` with each NUL character replaced by U+FFFD: PostgreSQL text cannot hold NUL, and
/// a ticket's text means the same on either store (a NUL is never meant in a 311 request).
pub(crate) fn without_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

impl NewTicket {
    /// The ticket with [`without_nul`] applied to every text.
    fn without_nul(mut self) -> NewTicket {
        let clean = |s: &mut String| {
            if s.contains('\0') {
                *s = without_nul(s).into_owned();
            }
        };
        clean(&mut self.service_code);
        clean(&mut self.service_name);
        for s in [
            &mut self.description,
            &mut self.agency_responsible,
            &mut self.service_notice,
            &mut self.zipcode,
            &mut self.house_number,
            &mut self.address,
            &mut self.address_id,
            &mut self.phone,
            &mut self.email,
            &mut self.first_name,
            &mut self.last_name,
            &mut self.media_url,
            &mut self.recording,
            &mut self.language,
            &mut self.call_id,
            &mut self.agent_id,
        ]
        .into_iter()
        .flatten()
        {
            clean(s);
        }
        self
    }
}

/// `2026-11-26T03:22:09Z` for a [`whole_second_utc`] time.
pub(crate) fn iso(t: OffsetDateTime) -> Result<String, StoreError> {
    Ok(t.format(&Rfc3339)?)
}

pub(crate) fn column<'r, T>(row: &'r AnyRow, column: &'static str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(column).map_err(|e| StoreError::BadRow {
        column,
        value: e.to_string(),
    })
}

pub(crate) fn datetime(column: &'static str, text: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|_| StoreError::BadRow {
        column,
        value: text.to_owned(),
    })
}

fn parsed<T: FromStr>(column: &'static str, text: String) -> Result<T, StoreError> {
    text.parse().map_err(|_| StoreError::BadRow {
        column,
        value: text,
    })
}

pub(crate) fn ticket_from_row(row: &AnyRow) -> Result<Ticket, StoreError> {
    let id: i64 = column(row, "service_request_id")?;
    let service_request_id = u64::try_from(id).map_err(|_| StoreError::BadRow {
        column: "service_request_id",
        value: id.to_string(),
    })?;
    let requested: String = column(row, "requested_datetime")?;
    let updated: String = column(row, "updated_datetime")?;
    let expected: Option<String> = column(row, "expected_datetime")?;
    Ok(Ticket {
        service_request_id,
        status: parsed("status", column(row, "status")?)?,
        status_notes: column(row, "status_notes")?,
        service_name: column(row, "service_name")?,
        service_code: column(row, "service_code")?,
        description: column(row, "description")?,
        agency_responsible: column(row, "agency_responsible")?,
        service_notice: column(row, "service_notice")?,
        requested_datetime: datetime("requested_datetime", &requested)?,
        updated_datetime: datetime("updated_datetime", &updated)?,
        expected_datetime: expected
            .map(|e| datetime("expected_datetime", &e))
            .transpose()?,
        address: column(row, "address")?,
        address_id: column(row, "address_id")?,
        zipcode: column(row, "zipcode")?,
        house_number: column(row, "house_number")?,
        lat: column(row, "lat")?,
        long: column(row, "long")?,
        media_url: column(row, "media_url")?,
        recording: column(row, "recording")?,
        phone: column(row, "phone")?,
        email: column(row, "email")?,
        first_name: column(row, "first_name")?,
        last_name: column(row, "last_name")?,
        channel: parsed("channel", column(row, "channel")?)?,
        language: column(row, "language")?,
        call_id: column(row, "call_id")?,
        callback_requested: column::<i64>(row, "callback_requested")? != 0,
        transfer: column(row, "transfer")?,
        agent_id: column(row, "agent_id")?,
        external_id: column(row, "external_id")?,
        duplicates: count("duplicates", column(row, "duplicates")?)?,
    })
}

/// A count column (`duplicates`), never negative.
fn count(column: &'static str, n: i64) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| StoreError::BadRow {
        column,
        value: n.to_string(),
    })
}

/// A [`PublicTicket`] from a row of [`PUBLIC_COLUMNS`], each column read by its place.
fn public_from_row(row: &AnyRow) -> Result<PublicTicket, StoreError> {
    fn at<'r, T>(row: &'r AnyRow, i: usize, column: &'static str) -> Result<T, StoreError>
    where
        T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
    {
        row.try_get(i).map_err(|e| StoreError::BadRow {
            column,
            value: e.to_string(),
        })
    }
    let id: i64 = at(row, 0, "service_request_id")?;
    let service_request_id = u64::try_from(id).map_err(|_| StoreError::BadRow {
        column: "service_request_id",
        value: id.to_string(),
    })?;
    let requested: String = at(row, 8, "requested_datetime")?;
    let updated: String = at(row, 9, "updated_datetime")?;
    let expected: Option<String> = at(row, 10, "expected_datetime")?;
    Ok(PublicTicket {
        service_request_id,
        service_code: at(row, 1, "service_code")?,
        service_name: at(row, 2, "service_name")?,
        status: parsed("status", at(row, 3, "status")?)?,
        status_notes: at(row, 4, "status_notes")?,
        description: at(row, 5, "description")?,
        agency_responsible: at(row, 6, "agency_responsible")?,
        service_notice: at(row, 7, "service_notice")?,
        requested_datetime: datetime("requested_datetime", &requested)?,
        updated_datetime: datetime("updated_datetime", &updated)?,
        expected_datetime: expected
            .map(|e| datetime("expected_datetime", &e))
            .transpose()?,
        zipcode: at(row, 11, "zipcode")?,
        address: at(row, 12, "address")?,
        address_id: at(row, 13, "address_id")?,
        lat: at(row, 14, "lat")?,
        long: at(row, 15, "long")?,
        media_url: at(row, 16, "media_url")?,
        external_id: at(row, 17, "external_id")?,
        duplicates: count("duplicates", at(row, 18, "duplicates")?)?,
    })
}

fn audit_from_row(row: &AnyRow) -> Result<EmergencyAuditRow, StoreError> {
    let at: String = column(row, "at")?;
    Ok(EmergencyAuditRow {
        id: column(row, "id")?,
        at: datetime("at", &at)?,
        caller: column(row, "caller")?,
        call_id: column(row, "call_id")?,
        menu_path: column(row, "menu_path")?,
        reason: column(row, "reason")?,
        method: column(row, "method")?,
        outcome: column(row, "outcome")?,
        caller_verified: column::<Option<i64>>(row, "caller_verified")?.map(|v| v != 0),
        operator: column(row, "operator")?,
        requested_via: column(row, "requested_via")?,
        destination: column(row, "destination")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU32, Ordering};
    use time::macros::datetime;

    /// A database file under the temp dir, removed (with -wal/-shm) on drop.
    struct TempDb(PathBuf);

    impl TempDb {
        fn new(name: &str) -> TempDb {
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "ivr311-tickets-{name}-{}-{n}.db",
                std::process::id()
            ));
            let db = TempDb(path);
            db.remove();
            db
        }

        /// A database for a test of behaviour both stores share: a SQLite file, or with
        /// `IVR311_TEST_PG` set a new PostgreSQL database (its URL as the path).
        async fn any(name: &str) -> TempDb {
            match TicketStore::test_postgres_database().await.unwrap() {
                Some(url) => TempDb(PathBuf::from(url)),
                None => TempDb::new(name),
            }
        }

        fn remove(&self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = self.0.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            self.remove();
        }
    }

    fn full_ticket(text: &str) -> NewTicket {
        NewTicket {
            service_code: format!("code-{text}"),
            service_name: format!("name-{text}"),
            description: Some(format!("description-{text}")),
            agency_responsible: Some(format!("agency-{text}")),
            service_notice: Some(format!("notice-{text}")),
            zipcode: Some(format!("zip-{text}")),
            house_number: Some(format!("house-{text}")),
            address: Some(format!("address-{text}")),
            address_id: Some(format!("address_id-{text}")),
            lat: Some(40.712_776),
            long: Some(-74.005_974),
            phone: Some(format!("phone-{text}")),
            email: Some(format!("email-{text}")),
            first_name: Some(format!("first-{text}")),
            last_name: Some(format!("last-{text}")),
            media_url: Some(format!("media-{text}")),
            recording: Some(format!("rec-{text}")),
            channel: Channel::Web,
            language: Some(format!("lang-{text}")),
            call_id: Some(format!("call-{text}")),
            callback_requested: true,
            agent_id: Some(format!("agent-{text}")),
        }
    }

    fn pothole() -> NewTicket {
        NewTicket {
            service_code: "pothole".into(),
            service_name: "Pothole".into(),
            ..NewTicket::default()
        }
    }

    async fn count(store: &TicketStore, table: &str) -> i64 {
        let sql = match table {
            "tickets" => "SELECT COUNT(*) FROM tickets",
            "callback_requests" => "SELECT COUNT(*) FROM callback_requests",
            _ => "SELECT COUNT(*) FROM emergency_redirects",
        };
        let row = sqlx::query(&db::sql(&store.pool, sql))
            .fetch_one(&store.pool)
            .await
            .unwrap();
        row.get(0)
    }

    #[tokio::test]
    async fn file_then_get_round_trips_every_field() {
        let db = TempDb::any("roundtrip").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let new = full_ticket("x");
        let filed = store.file(new.clone()).await.unwrap();
        let got = store.get(filed.service_request_id).await.unwrap().unwrap();
        assert_eq!(got, filed);
        assert_eq!(got.status, Status::Open);
        assert_eq!(got.status_notes, None);
        assert_eq!(got.expected_datetime, None);
        assert_eq!(got.requested_datetime, got.updated_datetime);
        assert_eq!(got.requested_datetime.nanosecond(), 0);
        assert_eq!(got.requested_datetime.offset(), time::UtcOffset::UTC);
        let expect = Ticket::filed(got.service_request_id, new, got.requested_datetime);
        assert_eq!(got, expect);
        assert!(store.get(ID_MIN - 1).await.unwrap().is_none());
        assert!(store.get(u64::MAX).await.unwrap().is_none());

        // All-None optionals round-trip too.
        let bare = store.file(pothole()).await.unwrap();
        assert_eq!(
            store.get(bare.service_request_id).await.unwrap(),
            Some(bare)
        );
    }

    /// A database from before operator tickets: the table is rebuilt to take `channel:
    /// operator` and `agent_id`, and the rows it held are kept whole.
    #[tokio::test]
    async fn tickets_from_before_operator_tickets_are_kept_whole() {
        let db = TempDb::new("operator-migration");
        let old_migrations = std::env::temp_dir().join(format!(
            "ivr311-pre-operator-migrations-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&old_migrations).unwrap();
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        for f in std::fs::read_dir(&here).unwrap() {
            let name = f.unwrap().file_name();
            if name.to_string_lossy().as_ref() < "20261201000003" {
                std::fs::copy(here.join(&name), old_migrations.join(&name)).unwrap();
            }
        }
        let t = full_ticket("old");
        {
            let options = SqliteConnectOptions::new()
                .filename(&db.0)
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            sqlx::migrate::Migrator::new(old_migrations.as_path())
                .await
                .unwrap()
                .run(&pool)
                .await
                .unwrap();
            sqlx::query(&db::sql(
                &pool,
                "INSERT INTO tickets (service_request_id, service_code, service_name, status, \
                 description, requested_datetime, updated_datetime, zipcode, phone, recording, \
                 channel, callback_requested, transfer) \
                 VALUES (33333333, ?, ?, 'open', ?, '2026-01-01T00:00:00Z', \
                 '2026-01-01T00:00:00Z', ?, ?, ?, 'phone', ?, \
                 'transferred to crisis by 1001 (refer)')",
            ))
            .bind(&t.service_code)
            .bind(&t.service_name)
            .bind(&t.description)
            .bind(&t.zipcode)
            .bind(&t.phone)
            .bind(&t.recording)
            .bind(i64::from(t.callback_requested))
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        std::fs::remove_dir_all(&old_migrations).unwrap();
        let store = TicketStore::open(&db.0).await.unwrap();
        let got = store.get(33_333_333).await.unwrap().unwrap();
        assert_eq!(got.service_code, t.service_code);
        assert_eq!(got.description, t.description);
        assert_eq!(got.zipcode, t.zipcode);
        assert_eq!(got.phone, t.phone);
        assert_eq!(got.recording, t.recording);
        assert_eq!(got.callback_requested, t.callback_requested);
        assert_eq!((got.channel, got.agent_id), (Channel::Phone, None));
        assert_eq!(
            got.transfer.as_deref(),
            Some("transferred to crisis by 1001 (refer)")
        );
        let op = store
            .file(NewTicket {
                channel: Channel::Operator,
                agent_id: Some("1001".into()),
                ..pothole()
            })
            .await
            .unwrap();
        let op = store.get(op.service_request_id).await.unwrap().unwrap();
        assert_eq!(op.channel, Channel::Operator);
        assert_eq!(op.agent_id.as_deref(), Some("1001"));
    }

    /// A database filed by a build that kept a phone ticket's recording in `media_url`: the
    /// migration moves it to `recording`, so it is no longer published.
    #[tokio::test]
    async fn recordings_of_older_tickets_leave_media_url() {
        let db = TempDb::new("recording-migration");
        let old_migrations = std::env::temp_dir().join(format!(
            "ivr311-old-migrations-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&old_migrations).unwrap();
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        for f in [
            "20260301000001_tickets.sql",
            "20260301000002_emergency_redirects.sql",
        ] {
            std::fs::copy(here.join(f), old_migrations.join(f)).unwrap();
        }
        {
            let options = SqliteConnectOptions::new()
                .filename(&db.0)
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            sqlx::migrate::Migrator::new(old_migrations.as_path())
                .await
                .unwrap()
                .run(&pool)
                .await
                .unwrap();
            for (id, channel, media) in [
                (11_111_111, "phone", "/recordings/1700000000-0a1b2c3d.wav"),
                (22_222_222, "web", "https://example.org/photo.jpg"),
            ] {
                sqlx::query(&db::sql(
                    &pool,
                    "INSERT INTO tickets (service_request_id, service_code, service_name, \
                     status, requested_datetime, updated_datetime, media_url, channel) \
                     VALUES (?, 'pothole', 'Pothole', 'open', '2026-01-01T00:00:00Z', \
                     '2026-01-01T00:00:00Z', ?, ?)",
                ))
                .bind(id)
                .bind(media)
                .bind(channel)
                .execute(&pool)
                .await
                .unwrap();
            }
            pool.close().await;
        }
        std::fs::remove_dir_all(&old_migrations).unwrap();
        let store = TicketStore::open(&db.0).await.unwrap();
        let phone = store.get(11_111_111).await.unwrap().unwrap();
        assert_eq!(phone.media_url, None);
        assert_eq!(phone.recording.as_deref(), Some("1700000000-0a1b2c3d.wav"));
        let web = store.get(22_222_222).await.unwrap().unwrap();
        assert_eq!(
            web.media_url.as_deref(),
            Some("https://example.org/photo.jpg")
        );
        assert_eq!(web.recording, None);
    }

    #[tokio::test]
    async fn the_write_probe_fails_as_a_ticket_would_and_leaves_nothing() {
        let db = TempDb::new("probe");
        let store = TicketStore::open(&db.0).await.unwrap();
        store.probe_write().await.unwrap();
        assert!(store
            .list(&TicketQuery::default())
            .await
            .unwrap()
            .is_empty());
        store.set_read_only(true).await.unwrap();
        assert!(matches!(
            store.probe_write().await,
            Err(StoreError::ReadOnly(_))
        ));
        store.set_read_only(false).await.unwrap();
        store.probe_write().await.unwrap();
    }

    /// A write that fails with the database full (SQLite then ends the transaction itself)
    /// leaves no transaction open on a pooled connection: once there is room again, another
    /// process can take the write lock, whatever the store did in between.
    #[tokio::test]
    async fn a_full_database_leaves_no_write_lock_behind() {
        use sqlx::{ConnectOptions, Connection};
        let db = TempDb::new("full-lock");
        let store = TicketStore::open(&db.0).await.unwrap();
        store.set_max_pages(Some(1)).await.unwrap();
        // Fill the pages there are: a ticket's random number picks the leaf it goes in (in
        // the table and each index), so one that does not fit says little; fifty in a row,
        // with the smallest tickets there can be, leave no room for the probe's.
        let tiny = || NewTicket {
            service_code: "x".into(),
            service_name: "x".into(),
            ..NewTicket::default()
        };
        let (mut filed, mut refused) = (0, 0);
        while refused < 50 {
            match store.file(tiny()).await {
                Ok(_) => {
                    filed += 1;
                    refused = 0;
                }
                Err(_) => refused += 1,
            }
            assert!(filed < 100_000, "the cap never filled");
        }
        for _ in 0..3 {
            assert!(matches!(
                store.probe_write().await,
                Err(StoreError::Full(_))
            ));
            let _ = store.claim_callback("+12125550100", "c", 3).await;
        }
        store.set_max_pages(None).await.unwrap();
        for _ in 0..3 {
            store.probe_write().await.unwrap();
            store.claim_callback("+12125550100", "c", 3).await.unwrap();
        }
        let mut other = SqliteConnectOptions::new()
            .filename(&db.0)
            .busy_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .expect("no connection of the store holds the write lock");
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
        other.close().await.unwrap();
        store.close().await;
    }

    #[tokio::test]
    async fn serialises_with_open311_names_and_iso_times() {
        let store = TicketStore::open_in_memory().await.unwrap();
        let filed = store
            .file_with(
                full_ticket("j"),
                datetime!(2026-11-26 03:22:09.75 UTC),
                &mut || 12_345_678,
            )
            .await
            .unwrap();
        let json = serde_json::to_value(&filed).unwrap();
        assert_eq!(json["service_request_id"], 12_345_678);
        assert_eq!(json["status"], "open");
        assert_eq!(json["requested_datetime"], "2026-11-26T03:22:09Z");
        assert_eq!(json["updated_datetime"], "2026-11-26T03:22:09Z");
        assert!(json["expected_datetime"].is_null());
        assert_eq!(json["channel"], "web");
        assert_eq!(json["long"], -74.005_974);
        for key in [
            "status_notes",
            "service_name",
            "service_code",
            "description",
            "agency_responsible",
            "service_notice",
            "address",
            "address_id",
            "zipcode",
            "lat",
            "media_url",
        ] {
            assert!(json.get(key).is_some(), "{key} missing");
        }
        let back: Ticket = serde_json::from_value(json).unwrap();
        assert_eq!(back, filed);
    }

    #[tokio::test]
    async fn ids_are_8_digits_and_unique_across_2000_filings() {
        let db = TempDb::any("ids").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let t = store.file(pothole()).await.unwrap();
            let id = t.service_request_id;
            assert!((ID_MIN..=ID_MAX).contains(&id), "{id}");
            assert_eq!(id.to_string().len(), 8);
            assert!(seen.insert(id), "duplicate {id}");
        }
        assert_eq!(count(&store, "tickets").await, 2000);
    }

    #[tokio::test]
    async fn taken_numbers_are_redrawn_then_given_up_on() {
        let store = TicketStore::open_in_memory().await.unwrap();
        let now = OffsetDateTime::now_utc();
        let first = store
            .file_with(pothole(), now, &mut || 55_555_555)
            .await
            .unwrap();
        let mut draws = [55_555_555, 55_555_555, 66_666_666].into_iter();
        let second = store
            .file_with(pothole(), now, &mut || draws.next().unwrap_or(0))
            .await
            .unwrap();
        assert_eq!(first.service_request_id, 55_555_555);
        assert_eq!(second.service_request_id, 66_666_666);

        let err = store
            .file_with(pothole(), now, &mut || 55_555_555)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::NoFreeId {
                    attempts: ID_ATTEMPTS
                }
            ),
            "{err}"
        );
        assert!(!err.is_transient());
        assert_eq!(count(&store, "tickets").await, 2);
    }

    #[tokio::test]
    async fn list_filters_and_orders_newest_first() {
        let db = TempDb::any("list").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let day = |d: u8| datetime!(2026-03-01 12:00:00 UTC).replace_day(d).unwrap();
        let mut ids = Vec::new();
        for (n, (code, d)) in [
            ("pothole", 1),
            ("graffiti", 2),
            ("pothole", 3),
            ("noise", 4),
            ("pothole", 5),
        ]
        .into_iter()
        .enumerate()
        {
            let new = NewTicket {
                service_code: code.into(),
                service_name: code.into(),
                ..NewTicket::default()
            };
            let id = 20_000_000 + n as u64;
            let t = store.file_with(new, day(d), &mut || id).await.unwrap();
            ids.push(t.service_request_id);
        }
        store
            .update_status(ids[2], Status::Closed, Some("filled"))
            .await
            .unwrap();
        let list = |q: TicketQuery| {
            let store = store.clone();
            async move {
                store
                    .list(&q)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|t| t.service_request_id)
                    .collect::<Vec<_>>()
            }
        };

        // Everything, newest first.
        let all = list(TicketQuery::default()).await;
        assert_eq!(all, ids.iter().rev().copied().collect::<Vec<_>>());
        // ids.
        let q = TicketQuery {
            ids: vec![ids[0], ids[3], 99_999_999, u64::MAX],
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[3], ids[0]]);
        let q = TicketQuery {
            ids: vec![u64::MAX],
            ..TicketQuery::default()
        };
        assert!(list(q).await.is_empty());
        // service codes.
        let q = TicketQuery {
            service_codes: vec!["pothole".into()],
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[4], ids[2], ids[0]]);
        let q = TicketQuery {
            service_codes: vec!["noise".into(), "graffiti".into()],
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[3], ids[1]]);
        // A code named twice is one code; a limit holds over the codes merged.
        let q = TicketQuery {
            service_codes: vec!["pothole".into(), "noise".into(), "pothole".into()],
            limit: Some(3),
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[4], ids[3], ids[2]]);
        // status.
        let q = TicketQuery {
            status: Some(Status::Closed),
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[2]]);
        let q = TicketQuery {
            status: Some(Status::Open),
            service_codes: vec!["pothole".into()],
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[4], ids[0]]);
        // date range, inclusive, in any offset.
        let q = TicketQuery {
            start: Some(day(2)),
            end: Some(day(4)),
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[3], ids[2], ids[1]]);
        let q = TicketQuery {
            start: Some(day(4).to_offset(time::macros::offset!(-5))),
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[4], ids[3]]);
        let q = TicketQuery {
            end: Some(day(1) + time::Duration::milliseconds(999)),
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[0]]);
        let q = TicketQuery {
            start: Some(day(4)),
            end: Some(day(2)),
            ..TicketQuery::default()
        };
        assert!(list(q).await.is_empty());
        // limit.
        let q = TicketQuery {
            limit: Some(2),
            ..TicketQuery::default()
        };
        assert_eq!(list(q).await, vec![ids[4], ids[3]]);
        let q = TicketQuery {
            limit: Some(0),
            ..TicketQuery::default()
        };
        assert!(list(q).await.is_empty());
        // Too many filter values.
        let q = TicketQuery {
            ids: vec![ID_MIN; MAX_FILTER_VALUES + 1],
            ..TicketQuery::default()
        };
        let err = store.list(&q).await.unwrap_err();
        assert!(
            matches!(err, StoreError::TooManyFilterValues { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn default_limit_is_1000() {
        let store = TicketStore::open_in_memory().await.unwrap();
        let now = OffsetDateTime::now_utc();
        let mut next = ID_MIN;
        for _ in 0..1005 {
            store
                .file_with(pothole(), now, &mut || {
                    next += 1;
                    next
                })
                .await
                .unwrap();
        }
        let all = store.list(&TicketQuery::default()).await.unwrap();
        assert_eq!(all.len(), DEFAULT_LIST_LIMIT as usize);
        // Same second: ties broken by descending number.
        assert_eq!(all[0].service_request_id, ID_MIN + 1005);
    }

    #[tokio::test]
    async fn update_status_bumps_updated_datetime_and_notes() {
        let db = TempDb::any("update").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let filed_at = datetime!(2020-01-05 08:00:00 UTC);
        let t = store
            .file_with(pothole(), filed_at, &mut || 31_415_926)
            .await
            .unwrap();
        let later = datetime!(2020-01-06 09:30:00 UTC);
        let closed = store
            .update_status_at(
                t.service_request_id,
                Status::Closed,
                Some("Repaired 🚧"),
                later,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(closed.status, Status::Closed);
        assert_eq!(closed.status_notes.as_deref(), Some("Repaired 🚧"));
        assert_eq!(closed.requested_datetime, filed_at);
        assert_eq!(closed.updated_datetime, later);
        assert_eq!(
            store.get(t.service_request_id).await.unwrap(),
            Some(closed.clone())
        );

        // None keeps the notes; a clock that went backwards does not move the time back.
        let reopened = store
            .update_status_at(t.service_request_id, Status::Open, None, filed_at)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reopened.status, Status::Open);
        assert_eq!(reopened.status_notes.as_deref(), Some("Repaired 🚧"));
        assert_eq!(reopened.updated_datetime, later);

        // The public wrapper uses the real clock.
        let now = store
            .update_status(t.service_request_id, Status::Closed, Some("done"))
            .await
            .unwrap()
            .unwrap();
        assert!(now.updated_datetime > later);
        assert_eq!(now.status_notes.as_deref(), Some("done"));

        assert_eq!(
            store
                .update_status(ID_MIN, Status::Closed, None)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .update_status(u64::MAX, Status::Closed, None)
                .await
                .unwrap(),
            None
        );
    }

    /// What a 1,000-row list (the last 90 days, as Open311's default) costs in the store, in
    /// parts: walking the date index alone (the ticket numbers it holds), the query with every
    /// column (sqlx's rows), then [`ticket_from_row`] on those rows, and of that the three
    /// datetimes' parsing; then the same with Open311's columns ([`TicketStore::list_public`]). A measurement on a generated store in `IVR311_BENCH_DB`
    /// (BENCHMARKS.md, "A store with ten million tickets"), not an assertion:
    /// `cargo test --release --lib list_rows_at_scale -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark: needs a generated store in IVR311_BENCH_DB"]
    async fn list_rows_at_scale() {
        let path = std::env::var("IVR311_BENCH_DB").expect("IVR311_BENCH_DB: a generated store");
        let store = TicketStore::open(Path::new(&path)).await.unwrap();
        let since = OffsetDateTime::now_utc() - time::Duration::days(90);
        let since = iso(whole_second_utc(since)).unwrap();
        let tail = "FROM tickets WHERE requested_datetime >= ? \
                    ORDER BY requested_datetime DESC, service_request_id DESC LIMIT 1000";
        let ids_sql = format!("SELECT service_request_id {tail}");
        let ids_sql = db::sql(&store.pool, &ids_sql);
        let rows_sql = format!("SELECT {TICKET_COLUMNS} {tail}");
        let rows_sql = db::sql(&store.pool, &rows_sql);
        let public_sql = format!("SELECT {PUBLIC_COLUMNS} {tail}");
        let public_sql = db::sql(&store.pool, &public_sql);
        let (mut walk, mut fetch, mut decode, mut dates) = (vec![], vec![], vec![], vec![]);
        let (mut public, mut public_decode) = (vec![], vec![]);
        for _ in 0..200 {
            let t = std::time::Instant::now();
            let ids: Vec<i64> = sqlx::query_scalar(&ids_sql)
                .bind(&since)
                .fetch_all(&store.pool)
                .await
                .unwrap();
            walk.push(t.elapsed());
            let t = std::time::Instant::now();
            let rows = sqlx::query(&rows_sql)
                .bind(&since)
                .fetch_all(&store.pool)
                .await
                .unwrap();
            fetch.push(t.elapsed());
            let t = std::time::Instant::now();
            let tickets: Vec<Ticket> = rows.iter().map(|r| ticket_from_row(r).unwrap()).collect();
            decode.push(t.elapsed());
            let t = std::time::Instant::now();
            for r in &rows {
                for c in ["requested_datetime", "updated_datetime"] {
                    let text: String = column(r, c).unwrap();
                    std::hint::black_box(datetime(c, &text).unwrap());
                }
                let e: Option<String> = column(r, "expected_datetime").unwrap();
                std::hint::black_box(e.map(|e| datetime("expected_datetime", &e).unwrap()));
            }
            dates.push(t.elapsed());
            let t = std::time::Instant::now();
            let rows = sqlx::query(&public_sql)
                .bind(&since)
                .fetch_all(&store.pool)
                .await
                .unwrap();
            public.push(t.elapsed());
            let t = std::time::Instant::now();
            let listed: Vec<PublicTicket> =
                rows.iter().map(|r| public_from_row(r).unwrap()).collect();
            public_decode.push(t.elapsed());
            assert_eq!(listed.len(), 1000);
            assert_eq!((ids.len(), tickets.len(), rows.len()), (1000, 1000, 1000));
        }
        let ms = |d: &mut Vec<std::time::Duration>, q: f64| {
            d.sort();
            let i = ((d.len() as f64 * q).ceil() as usize).clamp(1, d.len()) - 1;
            d[i].as_secs_f64() * 1000.0
        };
        for (name, d) in [
            ("date index walk, numbers only", &mut walk),
            ("query, every column (rows)", &mut fetch),
            ("ticket_from_row x1000", &mut decode),
            ("  of which the datetimes", &mut dates),
            ("query, Open311's columns (rows)", &mut public),
            ("public_from_row x1000", &mut public_decode),
        ] {
            println!(
                "{name:<32} p50 {:.2} ms  p99 {:.2} ms",
                ms(d, 0.5),
                ms(d, 0.99)
            );
        }
        store.close().await;
    }

    /// A public list reads the same tickets, in the same order, with the same public fields,
    /// as the full one, whichever filters (the merged form of a few codes included).
    #[tokio::test]
    async fn public_lists_are_the_full_lists_public_fields() {
        let db = TempDb::any("public").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..30u32 {
            let at = datetime!(2026-11-01 08:00:00 UTC) + time::Duration::hours(i64::from(i / 2));
            let new = match i % 3 {
                0 => full_ticket("a"),
                1 => full_ticket("b"),
                _ => pothole(),
            };
            let mut n = 20_000_000 + i;
            let t = store
                .file_with(new, at, &mut || {
                    n += 1;
                    u64::from(n)
                })
                .await
                .unwrap();
            if i % 4 == 0 {
                store.add_duplicate(t.service_request_id).await.unwrap();
            }
            if i % 5 == 0 {
                let closed =
                    store.update_status_at(t.service_request_id, Status::Closed, Some("done"), at);
                closed.await.unwrap();
            }
            ids.push(t.service_request_id);
        }
        let codes = |c: &[&str]| c.iter().map(|c| (*c).to_string()).collect::<Vec<_>>();
        let queries = [
            TicketQuery::default(),
            TicketQuery {
                ids: ids[3..9].to_vec(),
                ..TicketQuery::default()
            },
            TicketQuery {
                service_codes: codes(&["code-a"]),
                ..TicketQuery::default()
            },
            TicketQuery {
                service_codes: codes(&["code-a", "pothole"]),
                status: Some(Status::Open),
                limit: Some(7),
                ..TicketQuery::default()
            },
            TicketQuery {
                status: Some(Status::Closed),
                start: Some(datetime!(2026-11-01 10:00:00 UTC)),
                end: Some(datetime!(2026-11-01 16:00:00 UTC)),
                ..TicketQuery::default()
            },
        ];
        for q in &queries {
            let full = store.list(q).await.unwrap();
            assert!(!full.is_empty(), "{q:?}");
            let want: Vec<PublicTicket> = full.into_iter().map(PublicTicket::from).collect();
            assert_eq!(store.list_public(q).await.unwrap(), want, "{q:?}");
        }
        store.close().await;
    }

    /// `duplicates` is read with every other column: by `get`, `list` (all of a long list)
    /// and the ticket a status change returns.
    #[tokio::test]
    async fn duplicates_come_with_the_ticket() {
        let db = TempDb::any("duplicates").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let mut filed = Vec::new();
        for _ in 0..60 {
            filed.push(store.file(pothole()).await.unwrap());
        }
        assert!(filed.iter().all(|t| t.duplicates == 0));
        let id = filed[0].service_request_id;
        assert!(store.add_duplicate(id).await.unwrap());
        assert!(store.add_duplicate(id).await.unwrap());
        assert_eq!(store.get(id).await.unwrap().unwrap().duplicates, 2);

        let all = store.list(&TicketQuery::default()).await.unwrap();
        assert_eq!(all.len(), 60);
        for t in &all {
            let want = if t.service_request_id == id { 2 } else { 0 };
            assert_eq!(t.duplicates, want, "{}", t.service_request_id);
        }
        let by_id = TicketQuery {
            ids: vec![id],
            ..TicketQuery::default()
        };
        assert_eq!(store.list(&by_id).await.unwrap()[0].duplicates, 2);

        // Closed: no more duplicates join it; the count stays.
        let closed = store
            .update_status(id, Status::Closed, Some("filled"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(closed.duplicates, 2);
        assert!(!store.add_duplicate(id).await.unwrap());
        assert_eq!(store.get(id).await.unwrap().unwrap().duplicates, 2);
        store.close().await;
    }

    #[tokio::test]
    async fn a_ticket_with_coordinates_files_after_one_without() {
        let db = TempDb::any("coordinates").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        // More than the pool's connections, so that each connection files both kinds.
        for _ in 0..2 * POSTGRES_CONNECTIONS {
            store.file(pothole()).await.unwrap();
            let mut web = pothole();
            (web.lat, web.long) = (Some(40.712_775_8), Some(-74.005_973_8));
            let filed = store.file(web).await.unwrap();
            let got = store.get(filed.service_request_id).await.unwrap().unwrap();
            assert_eq!(
                (got.lat, got.long),
                (Some(40.712_775_8), Some(-74.005_973_8))
            );
        }
    }

    #[tokio::test]
    async fn hostile_and_unicode_text_survives_unchanged() {
        let db = TempDb::any("hostile").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        for text in [
            "'); DROP TABLE tickets;--",
            "\" OR 1=1; --",
            "Robert'); DELETE FROM emergency_redirects; --",
            "🚨🕳️🐀 👩🏽‍🚒",
            "Calle Ñandú 5, señora Muñoz, ¿cuándo? Árbol caído — pingüino",
            "line\nbreak\ttab \\ backslash % _ ?1 :name $1",
            "nul\0inside",
            "",
        ] {
            let raw = text;
            let filed = store.file(full_ticket(raw)).await.unwrap();
            let got = store.get(filed.service_request_id).await.unwrap().unwrap();
            assert_eq!(got, filed, "{text:?}");
            // Every character kept, but NUL (which PostgreSQL text cannot hold) as U+FFFD.
            let text = &*raw.replace('\0', "\u{FFFD}");
            assert_eq!(
                got.description.as_deref(),
                Some(&*format!("description-{text}"))
            );
            let updated = store
                .update_status(filed.service_request_id, Status::Closed, Some(raw))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(updated.status_notes.as_deref(), Some(text));
            let q = TicketQuery {
                service_codes: vec![format!("code-{raw}")],
                ..TicketQuery::default()
            };
            let listed = store.list(&q).await.unwrap();
            assert_eq!(listed.len(), 1, "{text:?}");
            assert_eq!(listed[0].service_request_id, filed.service_request_id);

            let audit = EmergencyAudit {
                caller: Some(raw.into()),
                call_id: raw.into(),
                menu_path: raw.into(),
                reason: Some(raw.into()),
                method: raw.into(),
                caller_verified: false,
                operator: Some(raw.into()),
                requested_via: Some(raw.into()),
                destination: Some(raw.into()),
            };
            let id = store.audit_emergency_start(&audit).await.unwrap();
            store.audit_emergency_outcome(id, raw).await.unwrap();
            let row = store.emergency_audits(1).await.unwrap().remove(0);
            assert_eq!(row.id, id);
            assert_eq!(row.caller.as_deref(), Some(text));
            assert_eq!(row.call_id, text);
            assert_eq!(row.menu_path, text);
            assert_eq!(row.reason.as_deref(), Some(text));
            assert_eq!(row.method, text);
            assert_eq!(row.outcome, text);
            assert_eq!(row.operator.as_deref(), Some(text));
            assert_eq!(row.requested_via.as_deref(), Some(text));
            assert_eq!(row.destination.as_deref(), Some(text));
        }
        assert_eq!(count(&store, "tickets").await, 8);
        assert_eq!(count(&store, "emergency_redirects").await, 8);
    }

    #[tokio::test]
    async fn emergency_audit_is_written_then_its_outcome_updated() {
        let db = TempDb::any("audit").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let audit = EmergencyAudit {
            caller: Some("+15551234567".into()),
            call_id: "abc@host".into(),
            menu_path: "main>screen>1".into(),
            reason: Some("caller pressed 1: emergency".into()),
            method: "refer".into(),
            caller_verified: true,
            ..EmergencyAudit::default()
        };
        let before = whole_second_utc(OffsetDateTime::now_utc());
        let first = store.audit_emergency_start(&audit).await.unwrap();
        let second = store
            .audit_emergency_start(&EmergencyAudit {
                caller: None,
                reason: None,
                call_id: "def@host".into(),
                ..audit.clone()
            })
            .await
            .unwrap();
        assert!(second > first);

        let rows = store.emergency_audits(10).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, second);
        assert_eq!(rows[0].caller, None);
        assert_eq!(rows[1].id, first);
        assert_eq!(rows[1].outcome, "started");
        assert_eq!(rows[1].call_id, "abc@host");
        assert_eq!(rows[1].menu_path, "main>screen>1");
        assert_eq!(rows[1].method, "refer");
        assert_eq!(rows[1].caller.as_deref(), Some("+15551234567"));
        assert_eq!(rows[1].caller_verified, Some(true));
        assert!(rows[1].at >= before);

        store
            .audit_emergency_outcome(first, "connected")
            .await
            .unwrap();
        store
            .audit_emergency_outcome(second, "failed:503 Service Unavailable")
            .await
            .unwrap();
        let rows = store.emergency_audits(10).await.unwrap();
        assert_eq!(rows[1].outcome, "connected");
        assert_eq!(rows[0].outcome, "failed:503 Service Unavailable");
        assert_eq!(store.emergency_audits(1).await.unwrap().len(), 1);

        let err = store
            .audit_emergency_outcome(9999, "connected")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NoSuchAudit { id: 9999 }), "{err}");

        // The table refuses deletes and rewrites of anything but the outcome.
        let deleted = sqlx::query(&db::sql(&store.pool, "DELETE FROM emergency_redirects"))
            .execute(&store.pool)
            .await;
        assert!(deleted.is_err());
        let rewritten = sqlx::query(&db::sql(
            &store.pool,
            "UPDATE emergency_redirects SET caller = 'x'",
        ))
        .execute(&store.pool)
        .await;
        assert!(rewritten.is_err());
        let unverified = sqlx::query(&db::sql(
            &store.pool,
            "UPDATE emergency_redirects SET caller_verified = 0",
        ))
        .execute(&store.pool)
        .await;
        assert!(
            unverified.is_err(),
            "whether the caller was verified is not rewritten"
        );
        let redirected = sqlx::query(&db::sql(
            &store.pool,
            "UPDATE emergency_redirects SET destination = 'x'",
        ))
        .execute(&store.pool)
        .await;
        assert!(
            redirected.is_err(),
            "where the caller went is not rewritten"
        );
        assert_eq!(count(&store, "emergency_redirects").await, 2);
        assert_eq!(
            store.emergency_audits(10).await.unwrap()[1]
                .caller
                .as_deref(),
            Some("+15551234567")
        );
    }

    #[tokio::test]
    async fn read_only_store_refuses_writes_transiently_then_recovers() {
        let db = TempDb::any("ro").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let kept = store.file(full_ticket("kept")).await.unwrap();
        store.set_read_only(true).await.unwrap();
        // On every connection, however many the pool has open.
        for _ in 0..MAX_CONNECTIONS + 1 {
            let err = store.file(full_ticket("lost")).await.unwrap_err();
            assert!(matches!(err, StoreError::ReadOnly(_)), "{err}");
            assert!(err.is_transient());
        }
        let err = store
            .audit_emergency_start(&EmergencyAudit::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::ReadOnly(_)), "{err}");
        assert_eq!(
            store.get(kept.service_request_id).await.unwrap(),
            Some(kept)
        );
        store.set_read_only(false).await.unwrap();
        store.file(pothole()).await.unwrap();
        assert_eq!(count(&store, "tickets").await, 2);
    }

    #[tokio::test]
    async fn a_size_cap_makes_filing_fail_as_disk_full_then_recovers() {
        let db = TempDb::new("full");
        let store = TicketStore::open(&db.0).await.unwrap();
        let cap = store.set_max_pages(Some(1)).await.unwrap();
        assert!(cap > 1, "never below the current size: {cap}");
        // Fill the pages there are: tickets go into one table page until it must split.
        let mut filed = 0;
        let err = loop {
            match store.file(pothole()).await {
                Ok(_) => filed += 1,
                Err(e) => break e,
            }
            assert!(filed < 10_000, "the cap never bit");
        };
        assert!(matches!(err, StoreError::Full(_)), "{err}");
        assert!(err.is_transient());
        assert!(filed > 0);
        assert_eq!(count(&store, "tickets").await, filed);
        assert!(matches!(
            store.file(full_ticket("x")).await,
            Err(StoreError::Full(_))
        ));
        store.set_max_pages(None).await.unwrap();
        store.file(full_ticket("x")).await.unwrap();
        assert_eq!(count(&store, "tickets").await, filed + 1);
    }

    #[tokio::test]
    async fn held_write_lock_makes_file_fail_transiently_and_writes_nothing() {
        let db = TempDb::new("busy");
        let store = TicketStore::open(&db.0).await.unwrap();
        let kept = store.file(full_ticket("kept")).await.unwrap();

        let mut other = SqliteConnectOptions::new()
            .filename(&db.0)
            .connect()
            .await
            .unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut other)
            .await
            .unwrap();

        let started = std::time::Instant::now();
        let err = store.file(full_ticket("lost")).await.unwrap_err();
        assert!(matches!(err, StoreError::Busy(_)), "{err}");
        assert!(err.is_transient());
        assert!(started.elapsed() >= BUSY_TIMEOUT - Duration::from_millis(100));
        let err = store
            .audit_emergency_start(&EmergencyAudit::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Busy(_)), "{err}");
        // Readers are not blocked in WAL mode.
        assert_eq!(
            store.get(kept.service_request_id).await.unwrap(),
            Some(kept.clone())
        );

        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
        drop(other);
        assert_eq!(count(&store, "tickets").await, 1);
        assert_eq!(count(&store, "emergency_redirects").await, 0);
        let all = store.list(&TicketQuery::default()).await.unwrap();
        assert_eq!(all, vec![kept]);
        // And the store works again once the lock is gone.
        store.file(pothole()).await.unwrap();
        assert_eq!(count(&store, "tickets").await, 2);
    }

    /// A one-connection pool through the `Any` driver on SQLite `options` (what a URL can
    /// carry), with `pragmas` run on connecting.
    async fn any_pool(options: SqliteConnectOptions, pragmas: &'static [&'static str]) -> AnyPool {
        db::install_drivers();
        let options = AnyConnectOptions::from_url(&options.to_url_lossy()).unwrap();
        AnyPoolOptions::new()
            .max_connections(1)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    for p in pragmas {
                        sqlx::query(p).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn read_only_database_makes_file_fail_transiently() {
        let db = TempDb::new("readonly");
        let store = TicketStore::open(&db.0).await.unwrap();
        let kept = store.file(pothole()).await.unwrap();
        let options = SqliteConnectOptions::new()
            .filename(&db.0)
            .read_only(true)
            .busy_timeout(BUSY_TIMEOUT);
        let read_only = TicketStore {
            pool: any_pool(options, &[]).await,
            restrictions: Arc::default(),
            outbox: Arc::default(),
            outbox_wake: Arc::default(),
        };
        let err = read_only.file(full_ticket("lost")).await.unwrap_err();
        assert!(matches!(err, StoreError::ReadOnly(_)), "{err}");
        assert!(err.is_transient());
        let err = read_only
            .update_status(kept.service_request_id, Status::Closed, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::ReadOnly(_)), "{err}");
        assert_eq!(
            read_only.get(kept.service_request_id).await.unwrap(),
            Some(kept.clone())
        );
        read_only.health().await.unwrap();
        assert_eq!(
            store.list(&TicketQuery::default()).await.unwrap(),
            vec![kept]
        );
    }

    #[tokio::test]
    async fn full_database_makes_file_fail_transiently() {
        let db = TempDb::new("full");
        TicketStore::open(&db.0).await.unwrap().close().await;
        // Cap the file at its current size: the next page needed is "disk full".
        let options = SqliteConnectOptions::new().filename(&db.0);
        let full = TicketStore {
            pool: any_pool(
                options,
                &["PRAGMA journal_mode = WAL", "PRAGMA max_page_count = 1"],
            )
            .await,
            restrictions: Arc::default(),
            outbox: Arc::default(),
            outbox_wake: Arc::default(),
        };
        let mut err = None;
        for _ in 0..100 {
            if let Err(e) = full.file(full_ticket(&"x".repeat(2000))).await {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("never filled up");
        assert!(matches!(err, StoreError::Full(_)), "{err}");
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn callbacks_are_counted_per_number_over_24_hours_and_the_count_survives_a_restart() {
        let db = TempDb::any("callbacks").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let t0 = datetime!(2026-11-26 10:00:00 UTC);
        let claim = |store: &TicketStore, n: &'static str, at| {
            let store = store.clone();
            async move { store.claim_callback_at(n, "c@h", 2, at).await.unwrap() }
        };
        assert!(claim(&store, "+12125550123", t0).await);
        assert!(claim(&store, "+12125550123", t0 + time::Duration::hours(1)).await);
        // The third in the same 24 hours is refused, and refusing records nothing.
        assert!(!claim(&store, "+12125550123", t0 + time::Duration::hours(2)).await);
        assert_eq!(count(&store, "callback_requests").await, 2);
        // Another number has its own count.
        assert!(claim(&store, "+13125550199", t0 + time::Duration::hours(2)).await);
        // A restart (the file opened again) does not reset it.
        store.close().await;
        let store = TicketStore::open(&db.0).await.unwrap();
        assert!(!claim(&store, "+12125550123", t0 + time::Duration::hours(23)).await);
        // A day after the first, one is free again, and rows past the window are gone.
        assert!(claim(&store, "+12125550123", t0 + time::Duration::hours(24)).await);
        assert!(!claim(&store, "+12125550123", t0 + time::Duration::hours(24)).await);
        assert!(claim(&store, "+12125550123", t0 + time::Duration::hours(25)).await);
        // Left: the two at 24 h and 25 h, and the other number's at 2 h.
        assert_eq!(count(&store, "callback_requests").await, 3);
        // Ten at once for a fresh number: exactly its two are taken.
        let at = t0 + time::Duration::hours(30);
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..10 {
            all.spawn(claim(&store, "+14155550100", at));
        }
        let taken = all.join_all().await.into_iter().filter(|t| *t).count();
        assert_eq!(taken, 2);
    }

    #[tokio::test]
    async fn tickets_survive_reopening_the_file() {
        let db = TempDb::any("reopen").await;
        let store = TicketStore::open(&db.0).await.unwrap();
        let mut filed = Vec::new();
        for n in 0..5 {
            filed.push(store.file(full_ticket(&n.to_string())).await.unwrap());
        }
        let audit = store
            .audit_emergency_start(&EmergencyAudit {
                call_id: "c".into(),
                menu_path: "m".into(),
                method: "refer".into(),
                ..EmergencyAudit::default()
            })
            .await
            .unwrap();
        // Committed work is visible to a second, independent opener at once.
        let second = TicketStore::open(&db.0).await.unwrap();
        assert_eq!(
            second
                .get(filed[4].service_request_id)
                .await
                .unwrap()
                .as_ref(),
            Some(&filed[4])
        );
        second.close().await;
        store.close().await;
        assert!(store.health().await.is_err());
        drop(store);

        // Migrations are idempotent on reopen.
        let store = TicketStore::open(&db.0).await.unwrap();
        for t in &filed {
            assert_eq!(
                store.get(t.service_request_id).await.unwrap().as_ref(),
                Some(t)
            );
        }
        assert_eq!(store.emergency_audits(5).await.unwrap()[0].id, audit);
        store.health().await.unwrap();
    }

    #[tokio::test]
    async fn file_databases_are_wal_full_sync_with_busy_timeout() {
        let db = TempDb::new("pragmas");
        let store = TicketStore::open(&db.0).await.unwrap();
        // Check several pooled connections, not just the first.
        let mut conns = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            conns.push(store.pool.acquire().await.unwrap());
        }
        for conn in &mut conns {
            let pragma = |name: &'static str| format!("PRAGMA {name}");
            let mode: String = sqlx::query(&db::sql(&**conn, &pragma("journal_mode")))
                .fetch_one(&mut **conn)
                .await
                .unwrap()
                .get(0);
            assert_eq!(mode, "wal");
            for (name, want) in [
                ("synchronous", 2), // FULL
                ("foreign_keys", 1),
                ("busy_timeout", 2000),
            ] {
                let got: i64 = sqlx::query(&db::sql(&**conn, &pragma(name)))
                    .fetch_one(&mut **conn)
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(got, want, "{name}");
            }
        }
    }

    #[tokio::test]
    async fn unopenable_path_is_an_open_error() {
        let dir = std::env::temp_dir().join(format!("ivr311-no-such-dir-{}", std::process::id()));
        let err = TicketStore::open(&dir.join("t.db")).await.unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn invalid_coordinates_are_refused() {
        let store = TicketStore::open_in_memory().await.unwrap();
        for (lat, long) in [
            (Some(f64::NAN), Some(0.0)),
            (Some(0.0), Some(f64::INFINITY)),
            (Some(91.0), Some(0.0)),
            (Some(0.0), Some(-180.5)),
            (Some(1.0), None),
            (None, Some(1.0)),
        ] {
            let t = NewTicket {
                lat,
                long,
                ..pothole()
            };
            let err = store.file(t).await.unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidCoordinates { .. }),
                "{err}"
            );
        }
        assert_eq!(count(&store, "tickets").await, 0);
    }

    #[tokio::test]
    async fn in_memory_stores_are_separate() {
        let a = TicketStore::open_in_memory().await.unwrap();
        let b = TicketStore::open_in_memory().await.unwrap();
        let t = a.file(pothole()).await.unwrap();
        assert!(b.get(t.service_request_id).await.unwrap().is_none());
        assert_eq!(a.get(t.service_request_id).await.unwrap(), Some(t));
        a.health().await.unwrap();
    }

    /// Handlers and call tasks are spawned: every operation's future must be `Send`.
    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: &T) {}
        async fn all(s: TicketStore) {
            let f = s.file(NewTicket::default());
            send(&f);
            let q = TicketQuery::default();
            let g = s.list(&q);
            send(&g);
            let h = s.update_status(1, Status::Open, None);
            send(&h);
            let a = EmergencyAudit::default();
            let i = s.audit_emergency_start(&a);
            send(&i);
            send(&s.audit_emergency_outcome(1, "x"));
            send(&s.emergency_audits(1));
            send(&s.get(1));
            send(&s.health());
            send(&TicketStore::open(Path::new("x")));
            send(&TicketStore::open_in_memory());
        }
        let _ = all;
    }

    #[tokio::test]
    async fn a_callers_earlier_requests_are_found_by_number_newest_first_within_the_window() {
        let store = TicketStore::open_in_memory().await.unwrap();
        let at = |days_ago: i64| OffsetDateTime::now_utc() - time::Duration::days(days_ago);
        let mut ids = 10_000_000u64;
        let mut file = |phone: &str, days_ago: i64, channel: Channel| {
            ids += 1;
            let id = ids;
            let t = NewTicket {
                phone: Some(phone.into()),
                channel,
                agent_id: (channel == Channel::Operator).then(|| "1001".to_owned()),
                ..pothole()
            };
            let store = store.clone();
            async move { store.file_with(t, at(days_ago), &mut || id).await.unwrap() }
        };
        let old = file("+15551230001", 120, Channel::Phone).await;
        let recent = file("+15551230001", 10, Channel::Phone).await;
        let newest = file("+15551230001", 1, Channel::Operator).await;
        let _other = file("+15551230002", 1, Channel::Phone).await;
        let found = store.by_phone("+15551230001", at(90), 20).await.unwrap();
        let numbers: Vec<u64> = found.iter().map(|t| t.service_request_id).collect();
        assert_eq!(
            numbers,
            vec![newest.service_request_id, recent.service_request_id]
        );
        assert!(!numbers.contains(&old.service_request_id));
        assert_eq!(found[0].channel, Channel::Operator);
        assert_eq!(found[0].agent_id.as_deref(), Some("1001"));
    }

    #[test]
    fn status_and_channel_parse_and_print() {
        for s in [Status::Open, Status::Closed] {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        for c in [Channel::Phone, Channel::Web, Channel::Operator] {
            assert_eq!(c.as_str().parse::<Channel>(), Ok(c));
        }
        assert!("Open".parse::<Status>().is_err());
        assert!("fax".parse::<Channel>().is_err());
    }
}
