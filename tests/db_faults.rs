//! Database trouble while a caller files a ticket: a read-only database, a full disk and a
//! lock held by another connection. Each time the caller hears the apology and is put
//! through to the operator queue (an agent's phone rings), nothing is half-written, the server
//! stays up, and once the fault is gone the next caller files normally.
//!
//! How the faults are made, so that they also bite when the tests run as root (where file
//! modes do not stop writes): read-only is `PRAGMA query_only` on every connection of the
//! server's pool ([`TicketStore::set_read_only`]); disk full is `PRAGMA max_page_count` at the
//! database's current size with its last free page space used up
//! ([`TicketStore::set_max_pages`]), which SQLite reports as `SQLITE_FULL` exactly as for a
//! full disk; the lock is `BEGIN EXCLUSIVE` on a connection of the test's own. The lock without
//! an operator is covered in tests/menu_calls.rs.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::tickets::{NewTicket, StoreError, TicketStore};
use ivr311::media::g711::Codec;
use sqlx::Connection;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
enum Fault {
    ReadOnly,
    DiskFull,
    Locked,
}

/// What holds a fault in place until it is removed.
enum Held {
    Store,
    Lock(sqlx::SqliteConnection),
}

async fn inject(fault: Fault, store: &TicketStore, db: &Path) -> Held {
    match fault {
        Fault::ReadOnly => {
            store.set_read_only(true).await.unwrap();
            Held::Store
        }
        Fault::DiskFull => {
            store.set_max_pages(Some(1)).await.unwrap();
            // Use up the room left in the pages there are, with the smallest tickets there
            // can be: after that no caller's ticket fits. A ticket's random number picks the
            // leaf it goes in (in the table and in each index), so the room is gone only
            // when fifty in a row are refused.
            let mut refused = 0;
            for n in 0.. {
                assert!(n < 100_000, "the cap never filled");
                let tiny = NewTicket {
                    service_code: "x".into(),
                    service_name: "x".into(),
                    ..NewTicket::default()
                };
                match store.file(tiny).await {
                    Ok(_) => refused = 0,
                    Err(StoreError::Full(_)) if refused == 49 => break,
                    Err(StoreError::Full(_)) => refused += 1,
                    Err(e) => panic!("filling the database: {e}"),
                }
            }
            Held::Store
        }
        Fault::Locked => {
            let mut lock = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
                .await
                .unwrap();
            sqlx::query("BEGIN EXCLUSIVE")
                .execute(&mut lock)
                .await
                .unwrap();
            Held::Lock(lock)
        }
    }
}

async fn remove(fault: Fault, held: Held, store: &TicketStore) {
    match (fault, held) {
        (Fault::ReadOnly, _) => store.set_read_only(false).await.unwrap(),
        (Fault::DiskFull, _) => {
            store.set_max_pages(None).await.unwrap();
        }
        (Fault::Locked, Held::Lock(mut lock)) => {
            sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
            lock.close().await.unwrap();
        }
        (Fault::Locked, Held::Store) => unreachable!("a lock is held by a connection"),
    }
}

async fn fault_during_filing_reaches_the_operator_and_recovers(fault: Fault) {
    let args = serve_args();
    let db = args.db.clone();
    let srv = start_server_with(args, agents_config(&["1001"], 20, 2)).await;
    let agent = TestAgent::login(srv.sip_addr, "1001").await;
    let held = inject(fault, &srv.tickets, &db).await;
    let before = srv.tickets.list(&Default::default()).await.unwrap().len();

    // The apology is 5 s long; a lock is waited on for the busy timeout (2 s) before it.
    let (mut ua, got) = file_pothole(srv.sip_addr, Duration::from_millis(9000)).await;
    let apology = got.iter().position(|p| p == "db_error");
    let hold = got.iter().position(|p| p == "operator_queue");
    assert!(
        apology.is_some() && hold > apology,
        "{fault:?}: told, then put through to the operator: heard {got:?}"
    );
    assert!(
        !got.contains(&"ticket_filed".to_owned()),
        "{fault:?}: no number read for an unsaved ticket"
    );
    // The operator's phone rings with the caller.
    let inv = agent.request("INVITE", Duration::from_secs(10)).await;
    assert_eq!(inv.header("X-311-Queue"), Some("general"));
    assert_eq!(inv.from.user(), Some("+15550001111"));
    agent.reply(&inv, 180, "Ringing", None).await;
    ua.bye().await;
    let cancel = agent.request("CANCEL", Duration::from_secs(5)).await;
    agent.reply(&cancel, 200, "OK", None).await;
    agent.reply(&inv, 487, "Request Terminated", None).await;

    // The server is up, and nothing of the failed ticket was written.
    assert_eq!(health(srv.http_addr).await["status"], "ok");
    assert!(srv
        .tickets
        .list(&Default::default())
        .await
        .unwrap()
        .iter()
        .all(|t| t.call_id.as_deref() != Some(ua.call_id.as_str())));

    // The database recovers: the next caller files normally.
    remove(fault, held, &srv.tickets).await;
    let (mut ua2, got) = file_pothole(srv.sip_addr, Duration::from_millis(3000)).await;
    assert!(
        got.contains(&"ticket_filed".to_owned()) && !got.contains(&"db_error".to_owned()),
        "{fault:?}: after recovery heard {got:?}"
    );
    ua2.bye().await;
    let all = srv.tickets.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), before + 1, "{fault:?}: exactly the new ticket");
    let t = all
        .iter()
        .find(|t| t.call_id.as_deref() == Some(ua2.call_id.as_str()))
        .expect("the recovered caller's ticket");
    assert_eq!(t.zipcode.as_deref(), Some("94107"));
    srv.shutdown().await;
}

#[tokio::test]
async fn read_only_database() {
    fault_during_filing_reaches_the_operator_and_recovers(Fault::ReadOnly).await;
}

#[tokio::test]
async fn disk_full() {
    fault_during_filing_reaches_the_operator_and_recovers(Fault::DiskFull).await;
}

#[tokio::test]
async fn lock_held_by_another_connection() {
    fault_during_filing_reaches_the_operator_and_recovers(Fault::Locked).await;
}

#[tokio::test]
async fn with_no_operator_either_the_caller_is_told_to_call_again_not_offered_a_ticket() {
    let srv = start_server(FileConfig::default()).await;
    srv.tickets.set_read_only(true).await.unwrap();
    let (mut ua, got) = file_pothole(srv.sip_addr, Duration::from_millis(7000)).await;
    let apology = got.iter().position(|p| p == "db_error");
    let later = got.iter().position(|p| p == "call_again_later");
    assert!(
        apology.is_some() && later > apology,
        "told, then to call again: heard {got:?}"
    );
    assert!(
        !got.contains(&"operator_unavailable".to_owned()),
        "not offered another ticket: {got:?}"
    );
    ua.expect_request("BYE", Duration::from_secs(15)).await;
    assert_eq!(health(srv.http_addr).await["status"], "ok");
    srv.shutdown().await;
}

#[tokio::test]
async fn a_waiting_callers_call_back_is_confirmed_only_once_it_is_saved() {
    // Only a number a trusted trunk asserts is called back: the caller comes through one.
    let mut file = agents_config(&["1001"], 30, 2);
    file.trunks.allow = vec!["127.0.0.1".parse().unwrap()];
    let srv = start_server(file).await;
    let agent = TestAgent::login(srv.sip_addr, "1001").await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let pai = "P-Asserted-Identity: <sip:+12122000123@127.0.0.1>\r\n";
    assert_eq!(ua.call_with("0 101", pai).await.1.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;
    // Waiting: the operator's phone rings and nobody answers.
    let inv = agent.request("INVITE", Duration::from_secs(10)).await;
    agent.reply(&inv, 180, "Ringing", None).await;
    let ear = PromptEar::new("en", &["db_error", "callback_confirmed"], Codec::Pcmu);

    // The database refuses: the caller is told, not promised a call back, and keeps waiting.
    srv.tickets.set_read_only(true).await.unwrap();
    ua.press('2').await;
    let got = prompts_heard(&ear, &ua.listen(Duration::from_millis(6500)).await);
    assert!(
        got.contains(&"db_error".to_owned()) && !got.contains(&"callback_confirmed".to_owned()),
        "told the request was not saved: heard {got:?}"
    );
    let (_, q) = http(srv.http_addr, "GET", "/admin/queues", &[], b"").await;
    let q: serde_json::Value = serde_json::from_str(&q).unwrap();
    assert_eq!(q[0]["waiting"], 1, "still in the queue: {q}");
    assert!(srv
        .tickets
        .list(&Default::default())
        .await
        .unwrap()
        .is_empty());

    // Once it can be saved, pressing 2 again is confirmed, stored, and the call ends.
    srv.tickets.set_read_only(false).await.unwrap();
    ua.press('2').await;
    let got = prompts_heard(&ear, &ua.listen(Duration::from_millis(4000)).await);
    assert!(
        got.contains(&"callback_confirmed".to_owned()),
        "confirmed: heard {got:?}"
    );
    let all = srv.tickets.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 1, "one call-back ticket");
    assert!(all[0].callback_requested);
    assert_eq!(all[0].phone.as_deref(), Some("+12122000123"));
    let cancel = agent.request("CANCEL", Duration::from_secs(5)).await;
    agent.reply(&cancel, 200, "OK", None).await;
    agent.reply(&inv, 487, "Request Terminated", None).await;
    ua.expect_request("BYE", Duration::from_secs(15)).await;
    assert_eq!(health(srv.http_addr).await["status"], "ok");
    srv.shutdown().await;
}
