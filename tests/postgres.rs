//! The PostgreSQL schema (`migrations/postgres/`) against a real server the test starts
//! (tests/common/postgres.rs): it applies when two nodes start at once, it is the twin of the
//! SQLite schema (`migrations/`) table for table, column for column, index for index, and its
//! 911 audit is append-only as SQLite's is. Also the harness itself: a killed database cuts
//! its connections, and a restarted one serves the same URL with what was committed.

mod common;

use common::postgres::Postgres;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{Connection, PgPool, SqlitePool};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

static PG_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations");

async fn pg_pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

async fn migrated_sqlite() -> SqlitePool {
    // One connection: every connection to `sqlite::memory:` is a database of its own.
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    SQLITE_MIGRATOR.run(&pool).await.unwrap();
    pool
}

/// Two nodes starting at once against one empty database both run the migrations: one applies
/// them, the other waits for its lock and finds them applied; both start, and a node started
/// later finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_apply_when_two_nodes_start_at_once() {
    let pg = Postgres::start();
    let a = pg_pool(&pg.url()).await;
    let b = pg_pool(&pg.url()).await;
    let (ra, rb) = tokio::join!(PG_MIGRATOR.run(&a), PG_MIGRATOR.run(&b));
    ra.expect("node A's migrations");
    rb.expect("node B's migrations");

    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&a)
            .await
            .unwrap();
    let expected: Vec<(i64, bool)> = PG_MIGRATOR.iter().map(|m| (m.version, true)).collect();
    assert_eq!(
        applied, expected,
        "every migration applied once, successfully"
    );

    let c = pg_pool(&pg.url()).await;
    PG_MIGRATOR.run(&c).await.expect("a node started later");
    let tickets: i64 = sqlx::query_scalar("SELECT count(*) FROM tickets")
        .fetch_one(&c)
        .await
        .unwrap();
    assert_eq!(tickets, 0);
}

/// One table as a catalog describes it, in terms both databases share.
#[derive(Debug, Default, PartialEq, Eq)]
struct Table {
    /// name -> (type, NOT NULL, default)
    columns: BTreeMap<String, (String, bool, Option<String>)>,
    primary_key: BTreeSet<String>,
    /// name -> (columns in order, unique, partial)
    indexes: BTreeMap<String, (Vec<String>, bool, bool)>,
    triggers: BTreeSet<String>,
    checks: usize,
}

async fn sqlite_catalog(pool: &SqlitePool) -> BTreeMap<String, Table> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut catalog = BTreeMap::new();
    for (name, sql) in tables {
        let mut t = Table {
            // A table's CREATE statement as SQLite keeps it (columns added later included).
            checks: sql.matches("CHECK (").count(),
            ..Table::default()
        };
        let columns: Vec<(String, String, bool, Option<String>, i64)> = sqlx::query_as(
            "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?1)",
        )
        .bind(&name)
        .fetch_all(pool)
        .await
        .unwrap();
        for (column, ty, not_null, default, pk) in columns {
            let ty = match ty.as_str() {
                "INTEGER" => "bigint",
                "TEXT" => "text collate C",
                "REAL" => "double precision",
                "BLOB" => "bytea",
                other => panic!("{name}.{column}: SQLite type {other} has no mapping here"),
            };
            // A primary key is never NULL: SQLite's STRICT tables and rowid keys enforce it
            // without flagging the column NOT NULL.
            t.columns
                .insert(column.clone(), (ty.to_owned(), not_null || pk > 0, default));
            if pk > 0 {
                t.primary_key.insert(column);
            }
        }
        let indexes: Vec<(String, bool, String, bool)> =
            sqlx::query_as("SELECT name, \"unique\", origin, partial FROM pragma_index_list(?1)")
                .bind(&name)
                .fetch_all(pool)
                .await
                .unwrap();
        for (index, unique, origin, partial) in indexes {
            if origin == "pk" {
                continue;
            }
            let columns: Vec<(String,)> =
                sqlx::query_as("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                    .bind(&index)
                    .fetch_all(pool)
                    .await
                    .unwrap();
            let columns = columns.into_iter().map(|(c,)| c).collect();
            t.indexes.insert(index, (columns, unique, partial));
        }
        let triggers: Vec<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?1",
        )
        .bind(&name)
        .fetch_all(pool)
        .await
        .unwrap();
        t.triggers = triggers.into_iter().map(|(n,)| n).collect();
        catalog.insert(name, t);
    }
    catalog
}

async fn postgres_catalog(pool: &PgPool) -> BTreeMap<String, Table> {
    let mut catalog: BTreeMap<String, Table> = BTreeMap::new();
    /// table, column, type, NOT NULL, collation, default
    type ColumnRow = (String, String, String, bool, Option<String>, Option<String>);
    let columns: Vec<ColumnRow> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, \
                    is_nullable::text = 'NO', collation_name::text, column_default::text \
             FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (table, column, ty, not_null, collation, default) in columns {
        let ty = match collation {
            Some(c) => format!("{ty} collate {c}"),
            None => ty,
        };
        catalog
            .entry(table)
            .or_default()
            .columns
            .insert(column, (ty, not_null, default));
    }
    let indexes: Vec<(String, String, bool, bool, bool, Vec<String>)> = sqlx::query_as(
        "SELECT t.relname::text, ic.relname::text, i.indisprimary, i.indisunique, \
                i.indpred IS NOT NULL, \
                array_agg(a.attname::text ORDER BY k.ord) \
         FROM pg_index i \
         JOIN pg_class ic ON ic.oid = i.indexrelid \
         JOIN pg_class t ON t.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = t.relnamespace \
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
         JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum \
         WHERE n.nspname = 'public' AND t.relname <> '_sqlx_migrations' \
         GROUP BY t.relname, ic.relname, i.indisprimary, i.indisunique, i.indpred IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (table, index, primary, unique, partial, columns) in indexes {
        let t = catalog.entry(table).or_default();
        if primary {
            t.primary_key = columns.into_iter().collect();
        } else {
            t.indexes.insert(index, (columns, unique, partial));
        }
    }
    // Row triggers only: the TRUNCATE guard has no SQLite counterpart (SQLite has no TRUNCATE).
    let triggers: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, tg.tgname::text FROM pg_trigger tg \
         JOIN pg_class c ON c.oid = tg.tgrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND NOT tg.tgisinternal AND (tg.tgtype & 1) = 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (table, trigger) in triggers {
        catalog.entry(table).or_default().triggers.insert(trigger);
    }
    let checks: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.relname::text, count(*) FROM pg_constraint k \
         JOIN pg_class c ON c.oid = k.conrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND k.contype = 'c' GROUP BY c.relname",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (table, n) in checks {
        catalog.entry(table).or_default().checks = n as usize;
    }
    catalog
}

/// What differs between table `name` in SQLite (`s`) and in PostgreSQL (`p`), one line each.
fn table_differences(name: &str, s: &Table, p: &Table) -> Vec<String> {
    fn keyed<V: PartialEq + std::fmt::Debug>(
        out: &mut Vec<String>,
        what: String,
        s: &BTreeMap<String, V>,
        p: &BTreeMap<String, V>,
    ) {
        for key in s.keys().chain(p.keys()).collect::<BTreeSet<_>>() {
            match (s.get(key), p.get(key)) {
                (Some(_), None) => out.push(format!("{what}{key}: not in PostgreSQL")),
                (None, Some(_)) => out.push(format!("{what}{key}: not in SQLite")),
                (Some(a), Some(b)) if a != b => {
                    out.push(format!("{what}{key}: SQLite {a:?}, PostgreSQL {b:?}"))
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    keyed(&mut out, format!("column {name}."), &s.columns, &p.columns);
    keyed(
        &mut out,
        format!("index on {name}: "),
        &s.indexes,
        &p.indexes,
    );
    let as_map = |t: &BTreeSet<String>| t.iter().map(|n| (n.clone(), ())).collect();
    keyed(
        &mut out,
        format!("trigger on {name}: "),
        &as_map(&s.triggers),
        &as_map(&p.triggers),
    );
    if s.primary_key != p.primary_key {
        out.push(format!(
            "primary key of {name}: SQLite {:?}, PostgreSQL {:?}",
            s.primary_key, p.primary_key
        ));
    }
    if s.checks != p.checks {
        out.push(format!(
            "CHECK constraints on {name}: {} in SQLite, {} in PostgreSQL",
            s.checks, p.checks
        ));
    }
    out
}

/// The PostgreSQL schema is the SQLite schema's twin: the same tables with the same columns
/// (types translated, every text compared byte by byte), NOT NULLs, defaults, primary keys,
/// indexes (columns, uniqueness, partial or not), triggers and number of CHECK constraints.
/// A SQLite migration without its PostgreSQL twin fails here.
#[tokio::test]
async fn postgres_schema_is_the_twin_of_the_sqlite_schema() {
    let pg = Postgres::start();
    // A database of its own on the cluster, as an operator would create for ivr311.
    let url = pg.create_db("twin");
    let pool = pg_pool(&url).await;
    PG_MIGRATOR.run(&pool).await.expect("PostgreSQL migrations");
    let postgres = postgres_catalog(&pool).await;
    let sqlite = sqlite_catalog(&migrated_sqlite().await).await;
    assert!(sqlite.len() >= 10 && sqlite.contains_key("tickets"));

    let mut differences = Vec::new();
    for name in sqlite
        .keys()
        .chain(postgres.keys())
        .collect::<BTreeSet<_>>()
    {
        match (sqlite.get(name), postgres.get(name)) {
            (Some(_), None) => differences.push(format!("table {name}: not in PostgreSQL")),
            (None, Some(_)) => differences.push(format!("table {name}: not in SQLite")),
            (Some(s), Some(p)) => differences.extend(table_differences(name, s, p)),
            (None, None) => {}
        }
    }
    assert!(
        differences.is_empty(),
        "migrations/postgres/ is not the twin of migrations/: every schema change needs a \
         file in both.\n{}",
        differences.join("\n")
    );
}

/// The 911 audit is append-only in PostgreSQL as in SQLite: a row's outcome may change,
/// nothing else, and no row may be deleted (nor the table truncated).
#[tokio::test]
async fn postgres_emergency_audit_is_append_only() {
    let pg = Postgres::start();
    let pool = pg_pool(&pg.url()).await;
    PG_MIGRATOR.run(&pool).await.unwrap();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO emergency_redirects (at, caller, call_id, menu_path, method, outcome) \
         VALUES ('2026-12-08T10:00:00Z', '+12125550100', 'a@x', 'main:9', 'refer', 'started') \
         RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE emergency_redirects SET outcome = 'connected' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .expect("the outcome may change");

    let refused = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let err = sqlx::query(sql)
                .bind(id)
                .execute(&pool)
                .await
                .expect_err(sql);
            err.to_string()
        }
    };
    let e = refused("UPDATE emergency_redirects SET caller = NULL WHERE id = $1").await;
    assert!(e.contains("only outcome may change"), "{e}");
    let e = refused("UPDATE emergency_redirects SET outcome = 'x', at = at WHERE id = $1").await;
    assert!(e.contains("only outcome may change"), "{e}");
    let e = refused("DELETE FROM emergency_redirects WHERE id = $1").await;
    assert!(e.contains("append-only"), "{e}");
    let e = sqlx::query("TRUNCATE emergency_redirects")
        .execute(&pool)
        .await
        .expect_err("TRUNCATE")
        .to_string();
    assert!(e.contains("append-only"), "{e}");

    let row: (String, String) =
        sqlx::query_as("SELECT caller, outcome FROM emergency_redirects WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(row, ("+12125550100".to_owned(), "connected".to_owned()));
}

/// The harness: kill() cuts every connection and refuses new ones, as a crashed database
/// server does; restart() brings the same URL back with what was committed before the crash,
/// and a pool that lost its connections reconnects by itself.
#[tokio::test]
async fn postgres_killed_database_comes_back_on_the_same_url() {
    let mut pg = Postgres::start();
    let pool = pg_pool(&pg.url()).await;
    PG_MIGRATOR.run(&pool).await.unwrap();
    sqlx::query("INSERT INTO history_meta (key, value) VALUES ('before', 'the crash')")
        .execute(&pool)
        .await
        .unwrap();
    let mut held = pool.acquire().await.unwrap();

    pg.kill();
    assert!(!pg.is_running());
    assert!(
        sqlx::query("SELECT 1").execute(&mut *held).await.is_err(),
        "a connection open at the crash is cut"
    );
    drop(held);
    let refused = sqlx::PgConnection::connect(&pg.url()).await;
    assert!(
        refused.is_err(),
        "no new connection while the server is down"
    );

    pg.restart();
    assert!(pg.is_running());
    // The old pool's connections are dead: it discards them and connects again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let value: String = loop {
        match sqlx::query_scalar("SELECT value FROM history_meta WHERE key = 'before'")
            .fetch_one(&pool)
            .await
        {
            Ok(v) => break v,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the pool did not reconnect: {e}"),
        }
    };
    assert_eq!(value, "the crash");
}
