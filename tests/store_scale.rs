//! A store that holds a city's years, in small: `ivr311 tickets generate` makes a valid store
//! that Open311 lists and filters and that filing adds to, and the queries Open311 and the
//! menu send are served by an index (no full scan, no sort of every match), so that they
//! stay fast at ten million tickets (BENCHMARKS.md, "A store with ten million tickets").

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::generate::{generate, GenerateError, GeneratePlan};
use ivr311::dispatch::tickets::{Channel, NewTicket, TicketQuery, TicketStore};
use std::collections::HashSet;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const BASE: &str = "/open311/v2";
const KEY: &str = "k1";

fn temp_db(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ivr311-{tag}-{}.db", rand::random::<u64>()))
}

fn remove_db(db: &std::path::Path) {
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
}

fn plan(count: u64, append: bool) -> GeneratePlan {
    GeneratePlan {
        count,
        seed: 27,
        years: 2,
        append,
        now: OffsetDateTime::now_utc(),
    }
}

async fn get_json(addr: std::net::SocketAddr, path: &str) -> Vec<serde_json::Value> {
    let (status, body) = http(addr, "GET", &format!("{BASE}{path}"), &[], b"").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str::<serde_json::Value>(&body)
        .unwrap()
        .as_array()
        .expect("a JSON array")
        .clone()
}

fn at(v: &serde_json::Value, field: &str) -> OffsetDateTime {
    OffsetDateTime::parse(v[field].as_str().unwrap(), &Rfc3339).unwrap()
}

fn iso(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

#[tokio::test]
async fn a_generated_store_is_listed_and_filtered_by_open311_and_filed_into() {
    let db = temp_db("gen");
    let store = TicketStore::open(&db).await.unwrap();
    let report = generate(&store, &plan(2000, false)).await.unwrap();
    assert_eq!(report.written, 2000);
    assert!(
        (0.10..0.22).contains(&(report.open as f64 / 2000.0)),
        "about 15% open: {report:?}"
    );
    // A store with tickets is not generated into by mistake.
    let again = generate(&store, &plan(10, false)).await;
    assert!(
        matches!(again, Err(GenerateError::NotEmpty(2000))),
        "{again:?}"
    );
    store.close().await;

    let mut args = serve_args();
    args.db = db.clone();
    let mut file = FileConfig::default();
    file.open311.api_keys = vec![KEY.into()];
    file.open311.post_rate_per_minute = 0;
    let srv = start_server_with(args, file).await;
    let a = srv.http_addr;
    let now = OffsetDateTime::now_utc();

    // Default: the last 90 days, newest first.
    let recent = get_json(a, "/requests.json").await;
    assert!(!recent.is_empty());
    let times: Vec<OffsetDateTime> = recent.iter().map(|t| at(t, "requested_datetime")).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    assert!(times
        .iter()
        .all(|t| *t >= now - time::Duration::days(91) && *t <= now));
    // Everything the store holds for those 90 days, as the store itself says.
    let in_store = srv
        .tickets
        .list(&TicketQuery {
            start: Some(now - time::Duration::days(90)),
            ..TicketQuery::default()
        })
        .await
        .unwrap();
    assert!(recent.len().abs_diff(in_store.len()) <= 1, "same listing");
    // No personal data in public output.
    assert!(recent.iter().all(|t| t.get("phone").is_none()));

    // service_code, status and both together.
    let noise = get_json(a, "/requests.json?service_code=noise").await;
    assert!(!noise.is_empty());
    assert!(noise.iter().all(|t| t["service_code"] == "noise"));
    let closed = get_json(a, "/requests.json?status=closed").await;
    assert!(!closed.is_empty());
    assert!(closed
        .iter()
        .all(|t| t["status"] == "closed" && t["status_notes"].as_str().is_some()));
    let open_noise = get_json(a, "/requests.json?service_code=noise&status=open").await;
    assert!(open_noise
        .iter()
        .all(|t| t["service_code"] == "noise" && t["status"] == "open"));

    // A 90-day window a year ago.
    let (start, end) = (
        now - time::Duration::days(400),
        now - time::Duration::days(310),
    );
    let window = get_json(
        a,
        &format!(
            "/requests.json?start_date={}&end_date={}",
            iso(start),
            iso(end)
        ),
    )
    .await;
    assert!(!window.is_empty());
    assert!(window.iter().all(|t| {
        let r = at(t, "requested_datetime");
        r >= start - time::Duration::seconds(1) && r <= end
    }));
    assert!(window
        .iter()
        .all(|t| at(t, "updated_datetime") >= at(t, "requested_datetime")));

    // Lists of 1 and of 50 numbers.
    let ids: Vec<String> = window
        .iter()
        .take(50)
        .map(|t| t["service_request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 50);
    let one = get_json(a, &format!("/requests.json?service_request_id={}", ids[0])).await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["service_request_id"], ids[0].as_str());
    let fifty = get_json(
        a,
        &format!("/requests.json?service_request_id={}", ids.join(",")),
    )
    .await;
    let got: HashSet<&str> = fifty
        .iter()
        .map(|t| t["service_request_id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<HashSet<_>>());

    // Filing adds to it, from the phone side and through Open311.
    let filed = srv
        .tickets
        .file(NewTicket {
            service_code: "pothole".into(),
            service_name: "Pothole".into(),
            zipcode: Some("10001".into()),
            channel: Channel::Phone,
            ..NewTicket::default()
        })
        .await
        .unwrap();
    let body = format!("api_key={KEY}&service_code=pothole&lat=40.75&long=-73.99");
    let (status, posted) = http(
        a,
        "POST",
        &format!("{BASE}/requests.json"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{posted}");
    let posted: serde_json::Value = serde_json::from_str(&posted).unwrap();
    let posted_id = posted[0]["service_request_id"].as_str().unwrap().to_owned();
    let newest = get_json(a, "/requests.json?service_code=pothole").await;
    let top: HashSet<&str> = newest[..2]
        .iter()
        .map(|t| t["service_request_id"].as_str().unwrap())
        .collect();
    let filed_id = filed.service_request_id.to_string();
    assert_eq!(top, HashSet::from([filed_id.as_str(), posted_id.as_str()]));
    srv.shutdown().await;

    // And generation adds to it when asked to.
    let store = TicketStore::open(&db).await.unwrap();
    let more = generate(&store, &plan(500, true)).await.unwrap();
    assert_eq!((more.existing, more.written), (2002, 500));
    let all = store
        .list(&TicketQuery {
            limit: Some(5000),
            start: Some(now - time::Duration::days(3 * 365)),
            ..TicketQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 2502);
    let unique: HashSet<u64> = all.iter().map(|t| t.service_request_id).collect();
    assert_eq!(unique.len(), 2502, "numbers are unique");
    assert!(all
        .iter()
        .all(|t| (10_000_000..=99_999_999).contains(&t.service_request_id)));
    store.close().await;
    remove_db(&db);
}

/// The plan SQLite chooses for `sql`, one line per step.
async fn plan_of(pool: &sqlx::SqlitePool, sql: &str) -> String {
    let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
}

/// Every combination of the Open311 filters, as `TicketStore::list` writes its query (fixed
/// fragments, one placeholder per value; SQLite plans are the same for any bound values), and
/// the phone side's lookups, are served by an index in the order asked for: no full scan of
/// the tickets, no sort of every matching row. (SQLite-only: EXPLAIN QUERY PLAN.)
#[tokio::test]
async fn the_open311_and_phone_queries_use_an_index() {
    let db = temp_db("plans");
    let store = TicketStore::open(&db).await.unwrap();
    generate(&store, &plan(200, false)).await.unwrap();
    store.close().await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();

    const ORDER: &str = " ORDER BY requested_datetime DESC, service_request_id DESC LIMIT ?";
    // Open311 always bounds the dates: start_date alone, end_date alone, both, or neither
    // (then the last 90 days).
    let dates = [
        " AND requested_datetime >= ?",
        " AND requested_datetime <= ?",
        " AND requested_datetime >= ? AND requested_datetime <= ?",
    ];
    let mut checked = 0;
    for code in ["", " AND service_code IN (?)"] {
        for status in ["", " AND status = ?"] {
            for date in dates {
                let sql = format!("SELECT * FROM tickets WHERE 1 = 1{code}{status}{date}{ORDER}");
                let p = plan_of(&pool, &sql).await;
                assert!(p.contains("USING INDEX"), "{sql}\n{p}");
                assert!(!p.contains("SCAN tickets"), "a full scan: {sql}\n{p}");
                assert!(
                    !p.contains("TEMP B-TREE FOR ORDER BY"),
                    "every match sorted: {sql}\n{p}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 12);
    // Lists of numbers: looked up by number (the few found are then sorted).
    for n in [1, 50] {
        let list = vec!["?"; n].join(", ");
        let sql =
            format!("SELECT * FROM tickets WHERE 1 = 1 AND service_request_id IN ({list}){ORDER}");
        let p = plan_of(&pool, &sql).await;
        assert!(p.contains("INTEGER PRIMARY KEY"), "{sql}\n{p}");
        assert!(!p.contains("SCAN tickets"), "{sql}\n{p}");
    }
    // The menu's repeat-caller lookup (TicketStore::open_request_of) and a duplicate's.
    for sql in [
        "SELECT service_request_id, requested_datetime FROM tickets \
         WHERE phone = ? AND status = 'open' \
         ORDER BY requested_datetime DESC, service_request_id DESC LIMIT 1",
        "SELECT service_request_id FROM tickets \
         WHERE service_code = ? AND zipcode = ? AND status = 'open' \
         AND requested_datetime >= ? \
         ORDER BY requested_datetime DESC, service_request_id DESC LIMIT 1",
    ] {
        let p = plan_of(&pool, sql).await;
        assert!(p.contains("COVERING INDEX"), "{sql}\n{p}");
        assert!(!p.contains("TEMP B-TREE"), "{sql}\n{p}");
    }
    // The retention pass reads only what it still has to remove.
    for (sql, index) in [
        (
            "SELECT service_request_id, recording FROM tickets WHERE recording IS NOT NULL \
             AND requested_datetime < ? LIMIT ?",
            "tickets_recording_requested",
        ),
        (
            "SELECT service_request_id FROM tickets WHERE phone IS NOT NULL \
             AND phone <> 'erased' AND phone <> ? AND requested_datetime < ? LIMIT ?",
            "tickets_number_requested",
        ),
    ] {
        let p = plan_of(&pool, sql).await;
        assert!(p.contains(index), "{sql}\n{p}");
    }
    pool.close().await;
    remove_db(&db);
}

/// The command as an admin runs it: it fills an empty database, says what it did, and then
/// refuses to add to it without `--append`.
#[test]
fn tickets_generate_fills_an_empty_database_and_refuses_one_with_tickets() {
    let db = temp_db("gen-cli");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ivr311"))
            .args(["tickets", "generate", "--db"])
            .arg(&db)
            .args(["--count", "300", "--seed", "9", "--years", "1"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("300 ticket(s) written") && stdout.contains("300 in the database"),
        "{stdout}"
    );
    let out = run(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already holds 300 ticket(s)") && stderr.contains("--append"),
        "{stderr}"
    );
    let out = run(&["--append"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("600 in the database"));
    remove_db(&db);
}
