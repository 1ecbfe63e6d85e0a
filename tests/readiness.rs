//! Readiness (`GET /health/ready`) against the real server: each thing that keeps the node from
//! taking calls is broken in turn (the ticket store read-only, full and locked; the media clock
//! stalled; the SIP loop stalled; the server draining), and readiness answers 503 naming it,
//! while `/health` (liveness) keeps answering 200. Once the fault is gone it is ready again.
//! The SIP side says the same to an edge proxy's probe: an out-of-dialog OPTIONS is answered
//! 503 while the node is not ready, and 200 again after.
//!
//! The faults are made as in tests/db_faults.rs (`PRAGMA query_only`, `max_page_count`, an
//! exclusive lock held by the test's own connection) and with the server's fault drills for
//! the loops ([`RunningServer::drill_stall_media_clock`], `drill_stall_sip_loop`), which stop
//! the loop in place.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::tickets::{NewTicket, StoreError};
use ivr311::server::RunningServer;
use sqlx::{ConnectOptions, Connection};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// `GET /health/ready`: the status code and the reasons given.
async fn ready(http_addr: SocketAddr) -> (u16, Vec<String>) {
    let (code, body) = http(http_addr, "GET", "/health/ready", &[], b"").await;
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("readiness JSON: {e}: {body}"));
    let reasons = v["reasons"]
        .as_array()
        .unwrap_or_else(|| panic!("reasons: {body}"))
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    match code {
        200 => assert_eq!(v["status"], "ready", "{body}"),
        503 => assert_eq!(v["status"], "not ready", "{body}"),
        other => panic!("readiness answered {other}: {body}"),
    }
    (code, reasons)
}

/// Polls readiness until it answers `code` (with a reason containing `reason` for a 503),
/// and returns the reasons; panics after `within`.
async fn wait_ready(
    http_addr: SocketAddr,
    code: u16,
    reason: &str,
    within: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let (got, reasons) = ready(http_addr).await;
        if got == code && (code == 200 || reasons.iter().any(|r| r.contains(reason))) {
            return reasons;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never became {code} ({reason:?}); last: {got} {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The answer to an out-of-dialog OPTIONS (a load balancer's probe).
async fn options(sip: SocketAddr) -> u16 {
    let r = options_probe(sip, Duration::from_secs(5))
        .await
        .expect("OPTIONS is answered");
    if r.code == 503 {
        assert!(
            r.header("Retry-After").is_some(),
            "503 says when to come back"
        );
    }
    r.code
}

/// Polls OPTIONS until it answers `code`; panics after `within`.
async fn wait_options(sip: SocketAddr, code: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = options(sip).await;
        if got == code {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "OPTIONS never answered {code}; last {got}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_live(srv: &RunningServer) {
    let h = health(srv.http_addr).await;
    assert_eq!(h["status"], "ok", "liveness stays ok: {h}");
}

#[tokio::test]
async fn a_healthy_node_is_ready() {
    let srv = start_server(FileConfig::default()).await;
    let (code, reasons) = ready(srv.http_addr).await;
    assert_eq!((code, reasons), (200, vec![]));
    // The probe leaves nothing behind.
    assert!(srv
        .tickets
        .list(&Default::default())
        .await
        .unwrap()
        .is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn a_ticket_store_that_cannot_write_is_not_ready() {
    let args = serve_args();
    let db = args.db.clone();
    let srv = start_server_with(args, FileConfig::default()).await;
    let a = srv.http_addr;
    wait_ready(a, 200, "", Duration::from_secs(5)).await;

    // Read-only.
    wait_options(srv.sip_addr, 200, Duration::from_secs(5)).await;
    srv.tickets.set_read_only(true).await.unwrap();
    let reasons = wait_ready(a, 503, "ticket store cannot write", Duration::from_secs(5)).await;
    assert!(
        reasons.iter().any(|r| r.contains("read-only")),
        "{reasons:?}"
    );
    // The edge's probe is told too, without anyone asking over HTTP.
    wait_options(srv.sip_addr, 503, Duration::from_secs(5)).await;
    assert_live(&srv).await;
    srv.tickets.set_read_only(false).await.unwrap();
    wait_options(srv.sip_addr, 200, Duration::from_secs(5)).await;
    wait_ready(a, 200, "", Duration::from_secs(5)).await;

    // Full: capped at its size, with the room left used up by the smallest tickets there are.
    srv.tickets.set_max_pages(Some(1)).await.unwrap();
    for n in 0.. {
        assert!(n < 10_000, "the size cap never bit");
        let tiny = NewTicket {
            service_code: "x".into(),
            service_name: "x".into(),
            ..NewTicket::default()
        };
        match srv.tickets.file(tiny).await {
            Ok(_) => {}
            Err(StoreError::Full(_)) => break,
            Err(e) => panic!("filling the database: {e}"),
        }
    }
    let reasons = wait_ready(a, 503, "ticket store cannot write", Duration::from_secs(5)).await;
    assert!(reasons.iter().any(|r| r.contains("full")), "{reasons:?}");
    assert_live(&srv).await;
    srv.tickets.set_max_pages(None).await.unwrap();
    wait_ready(a, 200, "", Duration::from_secs(5)).await;

    // Locked by another process's transaction.
    // With a busy timeout: the readiness probe's own write may hold the lock for a moment.
    let mut lock = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .unwrap();
    let reasons = wait_ready(a, 503, "ticket store cannot write", Duration::from_secs(15)).await;
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("busy") || r.contains("no answer")),
        "{reasons:?}"
    );
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    lock.close().await.unwrap();
    wait_ready(a, 200, "", Duration::from_secs(10)).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_stalled_media_clock_is_not_ready() {
    let srv = start_server(FileConfig::default()).await;
    let a = srv.http_addr;
    wait_ready(a, 200, "", Duration::from_secs(5)).await;
    srv.drill_stall_media_clock(Duration::from_secs(6));
    wait_ready(a, 503, "media clock stalled", Duration::from_secs(5)).await;
    assert_live(&srv).await;
    // The threads turn again after the stall.
    wait_ready(a, 200, "", Duration::from_secs(10)).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_stalled_sip_loop_is_not_ready() {
    let srv = start_server(FileConfig::default()).await;
    let a = srv.http_addr;
    wait_ready(a, 200, "", Duration::from_secs(5)).await;
    srv.drill_stall_sip_loop(Duration::from_secs(6));
    wait_ready(a, 503, "SIP loop not answering", Duration::from_secs(5)).await;
    assert_live(&srv).await;
    wait_ready(a, 200, "", Duration::from_secs(10)).await;
    // And it answers calls again.
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_draining_server_is_not_ready() {
    let srv = start_server(FileConfig::default()).await;
    let a = srv.http_addr;
    wait_ready(a, 200, "", Duration::from_secs(5)).await;
    // A call in progress keeps the stopping server up (it hears the goodbye first).
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    let sip = srv.sip_addr;
    assert_eq!(options(sip).await, 200);
    let stop = tokio::spawn(srv.shutdown());
    wait_options(sip, 503, Duration::from_secs(2)).await;
    wait_ready(a, 503, "draining", Duration::from_secs(5)).await;
    let h = health(a).await;
    assert_eq!(h["status"], "ok", "liveness stays ok while draining: {h}");
    // The caller is told goodbye and hung up; answer the BYE so the call ends at once.
    let bye = ua.expect_request("BYE", Duration::from_secs(30)).await;
    ua.answer_request(&bye).await;
    stop.await.unwrap();
}
