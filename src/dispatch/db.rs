//! The database under the ticket store: embedded SQLite (the default, one node) or a shared
//! PostgreSQL server (several nodes), behind one code path.
//!
//! Every durable table (tickets, the 911 audit, the outbox, call history, announcements,
//! call-backs, privacy erasures) is read and written through sqlx's [`Any`](sqlx::Any)
//! driver, so each query is written once. Why `Any` and not a store trait with one
//! implementation per database: the queries are plain SQL that both databases accept, and
//! the handful that are not (date arithmetic for open data, upserts that keep a maximum,
//! substring search for records requests, per-connection write restrictions) branch on
//! [`Dialect`] where they stand, next to their SQLite twin, so a reader sees both at once.
//!
//! # Placeholders
//!
//! Queries are written with SQLite's `?` and `?N` placeholders. [`sql`] rewrites them to
//! PostgreSQL's `$N` (outside quoted text) when the database is PostgreSQL; on SQLite the
//! text is used as written, so the embedded default runs exactly the SQL it always did.
//!
//! # Schemas
//!
//! `migrations/` is the SQLite schema and `migrations/postgres/` its PostgreSQL twin; each
//! is run at start by the migrator of its dialect ([`migrator`]). PostgreSQL's migrator
//! holds an advisory lock while it runs, so nodes starting at once apply each migration
//! once.

use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool};
use std::borrow::Cow;
use std::sync::Once;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The SQLite schema, compiled in.
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations");
/// The PostgreSQL schema, compiled in.
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database a pool or connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Embedded SQLite: one file, one node.
    Sqlite,
    /// A PostgreSQL server shared by every node.
    Postgres,
}

impl Dialect {
    /// The dialect of a database URL (`sqlite:…` or `postgres://…`/`postgresql://…`).
    pub fn of_url(url: &str) -> Option<Dialect> {
        let scheme = url.split_once(':')?.0;
        match scheme {
            "sqlite" => Some(Dialect::Sqlite),
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            _ => None,
        }
    }
}

/// Something that knows which database it talks to.
pub trait HasDialect {
    /// The database's dialect.
    fn dialect(&self) -> Dialect;
}

impl HasDialect for Dialect {
    fn dialect(&self) -> Dialect {
        *self
    }
}

impl HasDialect for AnyPool {
    fn dialect(&self) -> Dialect {
        Dialect::of_url(self.connect_options().database_url.as_str()).unwrap_or(Dialect::Sqlite)
    }
}

impl HasDialect for sqlx::SqlitePool {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
}

impl HasDialect for AnyConnection {
    fn dialect(&self) -> Dialect {
        if self.backend_name().eq_ignore_ascii_case("postgresql") {
            Dialect::Postgres
        } else {
            Dialect::Sqlite
        }
    }
}

impl HasDialect for sqlx::Transaction<'_, sqlx::Any> {
    fn dialect(&self) -> Dialect {
        (**self).dialect()
    }
}

impl HasDialect for sqlx::pool::PoolConnection<sqlx::Any> {
    fn dialect(&self) -> Dialect {
        (**self).dialect()
    }
}

impl<T: HasDialect + ?Sized> HasDialect for &T {
    fn dialect(&self) -> Dialect {
        (**self).dialect()
    }
}

impl<T: HasDialect + ?Sized> HasDialect for &mut T {
    fn dialect(&self) -> Dialect {
        (**self).dialect()
    }
}

/// `query` as the database `on` wants it: unchanged for SQLite; for PostgreSQL each `?` and
/// `?N` outside quoted text becomes `$N`, numbered the way SQLite numbers them (a bare `?`
/// is one more than the largest number so far).
pub fn sql<'a>(on: impl HasDialect, query: &'a str) -> Cow<'a, str> {
    match on.dialect() {
        Dialect::Sqlite => Cow::Borrowed(query),
        Dialect::Postgres => {
            if query.contains('?') {
                Cow::Owned(numbered(query))
            } else {
                Cow::Borrowed(query)
            }
        }
    }
}

fn numbered(query: &str) -> String {
    let mut out = String::with_capacity(query.len() + 8);
    let mut chars = query.chars().peekable();
    let mut quote: Option<char> = None;
    let mut largest = 0u32;
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let n = match digits.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => largest + 1,
                };
                largest = largest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            None => out.push(c),
        }
    }
    out
}

/// The larger of two values: SQLite's two-argument `max`, PostgreSQL's `GREATEST`.
pub fn greatest(on: impl HasDialect) -> &'static str {
    match on.dialect() {
        Dialect::Sqlite => "max",
        Dialect::Postgres => "GREATEST",
    }
}

/// The Monday (`YYYY-MM-DD`) of the week of an ISO 8601 text `column`.
pub fn week_start(on: impl HasDialect, column: &str) -> String {
    match on.dialect() {
        Dialect::Sqlite => format!("date(substr({column}, 1, 10), '-6 days', 'weekday 1')"),
        Dialect::Postgres => format!(
            "to_char(date_trunc('week', CAST(substr({column}, 1, 10) AS DATE)), 'YYYY-MM-DD')"
        ),
    }
}

/// Days (fractional, a REAL/DOUBLE) from ISO 8601 text `earlier` to `later` (columns or
/// placeholders).
pub fn days_between(on: impl HasDialect, later: &str, earlier: &str) -> String {
    match on.dialect() {
        Dialect::Sqlite => format!("julianday({later}) - julianday({earlier})"),
        Dialect::Postgres => format!(
            "CAST(EXTRACT(EPOCH FROM (CAST({later} AS TIMESTAMPTZ) \
             - CAST({earlier} AS TIMESTAMPTZ))) / 86400 AS DOUBLE PRECISION)"
        ),
    }
}

/// The function giving the 1-based position of a substring (0: absent): SQLite's `instr`,
/// PostgreSQL's `strpos` (same arguments: text, then what to find).
pub fn instr(on: impl HasDialect) -> &'static str {
    match on.dialect() {
        Dialect::Sqlite => "instr",
        Dialect::Postgres => "strpos",
    }
}

/// PostgreSQL advisory lock keys (`0x33_31_31_NN`: "311" and a number).
pub mod locks {
    /// Held by every write transaction ([`super::lock_writes`]).
    pub const WRITE: i64 = 0x0033_3131;
    /// Held by the node that delivers the outbox and polls the CRM ([`super::Leader`]).
    pub const OUTBOX: i64 = 0x3331_3102;
    /// Held while the report rollup is rebuilt.
    pub const ROLLUP: i64 = 0x3331_3103;
    /// Held by every claim on an operator ([`crate::dispatch::cluster`]).
    pub const CLAIMS: i64 = 0x3331_3104;
}

/// Holds advisory lock `key` until the transaction open on `conn` ends (PostgreSQL; on
/// SQLite, one node, nothing is done).
pub async fn lock_xact(conn: &mut AnyConnection, key: i64) -> Result<(), sqlx::Error> {
    if conn.dialect() == Dialect::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Makes the transaction open on `conn` the only writing one until it ends: on PostgreSQL it
/// takes the cluster-wide [`locks::WRITE`] advisory lock (released at commit or rollback); on
/// SQLite the file's own write lock already does this, and nothing is done.
///
/// Why one lock for every write rather than row locks: the checks made inside writes (the
/// call-back limit per number and day, duplicate reports, id ranges the report rollup adds
/// in one statement) are then exact across nodes as they are in one SQLite file, with no
/// serialization failures to retry. Writes are short (one ticket, one batch of history), so
/// the cost is that they do not overlap, which is the embedded store's ceiling too.
pub async fn lock_writes(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    lock_xact(conn, locks::WRITE).await
}

/// How often a [`Leader`] checks that its lock's connection is alive, and how often a node
/// waiting for the lock tries again.
pub const LEADER_CHECK: Duration = Duration::from_secs(2);

/// This node's turn at work that one node at a time may do (delivering the outbox: two
/// nodes sending the same row would file it twice at the CRM).
///
/// On PostgreSQL, a session advisory lock held on a connection of its own, out of the pool:
/// a node that dies or loses the database loses the lock with its connection, and the next
/// node waiting takes it within [`LEADER_CHECK`]. On SQLite (one node) the turn is always
/// this node's.
pub struct Leader {
    conn: Option<AnyConnection>,
}

impl Leader {
    /// Waits until this node holds `key`, or `cancel` fires (`None`).
    pub async fn acquire(pool: &AnyPool, key: i64, cancel: &CancellationToken) -> Option<Leader> {
        if pool.dialect() == Dialect::Sqlite {
            return Some(Leader { conn: None });
        }
        let mut waiting_since_logged = false;
        loop {
            match Leader::try_once(pool, key).await {
                Ok(Some(conn)) => return Some(Leader { conn: Some(conn) }),
                Ok(None) => {
                    if !waiting_since_logged {
                        tracing::info!(lock = key, "another node holds this work; waiting");
                        waiting_since_logged = true;
                    }
                }
                Err(e) => tracing::warn!(lock = key, error = %e, "cannot take the lock"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(LEADER_CHECK) => {}
            }
        }
    }

    async fn try_once(pool: &AnyPool, key: i64) -> Result<Option<AnyConnection>, sqlx::Error> {
        let mut conn = pool.acquire().await?.detach();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        Ok(got.then_some(conn))
    }

    /// Resolves when the lock is lost (its connection broke). Never on SQLite.
    pub async fn lost(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(LEADER_CHECK).await;
            let alive =
                tokio::time::timeout(LEADER_CHECK, sqlx::query("SELECT 1").execute(&mut *conn));
            if !matches!(alive.await, Ok(Ok(_))) {
                return;
            }
        }
    }
}

/// The migrator of a dialect's schema.
pub fn migrator(dialect: Dialect) -> &'static Migrator {
    match dialect {
        Dialect::Sqlite => &SQLITE_MIGRATOR,
        Dialect::Postgres => &POSTGRES_MIGRATOR,
    }
}

/// Makes sqlx's `Any` driver able to open SQLite and PostgreSQL URLs. Idempotent.
pub fn install_drivers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(sqlx::any::install_default_drivers);
}

/// A PostgreSQL URL with its password, if any, replaced by `***`: for logs and errors.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(an unparsable database URL)".to_owned(),
    }
}

/// A unique-key violation: SQLite's `SQLITE_CONSTRAINT_PRIMARYKEY`/`UNIQUE` or PostgreSQL's
/// `23505`.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("1555") | Some("2067") | Some("23505")
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        let q = "SELECT a FROM t WHERE b = ? AND c IN (?, ?) AND d = '?' AND e = ?";
        assert_eq!(sql(Dialect::Sqlite, q), q);
        assert_eq!(
            sql(Dialect::Postgres, q),
            "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3) AND d = '?' AND e = $4"
        );
        assert_eq!(
            sql(Dialect::Postgres, "SELECT ?2, ?1, ?, ?1"),
            "SELECT $2, $1, $3, $1"
        );
        assert_eq!(
            sql(Dialect::Postgres, "SELECT 'it''s ?', ?"),
            "SELECT 'it''s ?', $1"
        );
    }

    #[test]
    fn urls_name_their_dialect_and_hide_passwords() {
        assert_eq!(Dialect::of_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(
            Dialect::of_url("postgres://u@h/db"),
            Some(Dialect::Postgres)
        );
        assert_eq!(
            Dialect::of_url("postgresql://u@h/db"),
            Some(Dialect::Postgres)
        );
        assert_eq!(Dialect::of_url("mysql://u@h/db"), None);
        assert_eq!(
            redacted("postgres://ivr:secret@db.city/311"),
            "postgres://ivr:***@db.city/311"
        );
    }
}
