//! Nodes on a shared PostgreSQL store, against a real PostgreSQL server the test starts
//! (tests/common/postgres.rs): what one node files, the others serve; a database that goes
//! away keeps calls going with the apology and the operator, makes the node not ready, and
//! comes back without a restart.

mod common;

use common::postgres::Postgres;
use common::*;
use ivr311::config::FileConfig;
use ivr311::server::RunningServer;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const KEY: &str = "pg-nodes-test-key";

/// A node on `pg` with `file`'s settings.
async fn node(pg: &Postgres, mut file: FileConfig) -> RunningServer {
    let mut args = serve_args();
    args.db = PathBuf::from(pg.url());
    file.open311.api_keys = vec![KEY.into()];
    file.open311.post_rate_per_minute = 0;
    start_server_with(args, file).await
}

/// `GET /health/ready`'s status code.
async fn ready_code(http_addr: std::net::SocketAddr) -> u16 {
    http(http_addr, "GET", "/health/ready", &[], b"").await.0
}

async fn until_ready_code(http_addr: std::net::SocketAddr, code: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = ready_code(http_addr).await;
        if got == code {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never {code}; last {got}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The service request ids Open311 on `http_addr` lists.
async fn open311_ids(http_addr: std::net::SocketAddr) -> Vec<u64> {
    let (code, body) = http(
        http_addr,
        "GET",
        "/open311/v2/requests.json?status=open",
        &[],
        b"",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut ids: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["service_request_id"].as_str().unwrap().parse().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

#[tokio::test]
async fn two_nodes_on_one_postgresql_serve_each_others_tickets_reports_and_audit() {
    let pg = Postgres::start();
    let a = node(&pg, FileConfig::default()).await;
    let b = node(&pg, FileConfig::default()).await;

    // A caller on node A files by phone and hears the number.
    let (mut ua, got) = file_pothole(a.sip_addr, Duration::from_millis(3000)).await;
    assert!(got.contains(&"ticket_filed".to_owned()), "heard {got:?}");
    ua.bye().await;
    let by_phone = a.tickets.list(&Default::default()).await.unwrap();
    assert_eq!(by_phone.len(), 1);
    assert_eq!(by_phone[0].zipcode.as_deref(), Some("94107"));

    // An app files on node B over Open311.
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("api_key", KEY)
        .append_pair("service_code", "pothole")
        .append_pair("attribute[zipcode]", "94103")
        .finish();
    let (code, text) = http(
        b.http_addr,
        "POST",
        "/open311/v2/requests.json",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{text}");

    // Each node lists both, with the same numbers.
    let on_a = open311_ids(a.http_addr).await;
    let on_b = open311_ids(b.http_addr).await;
    assert_eq!(on_a.len(), 2, "{on_a:?}");
    assert_eq!(on_a, on_b);
    assert!(on_a.contains(&by_phone[0].service_request_id));

    // The call's history row reaches the shared store: node B's report counts node A's call.
    let today = time::OffsetDateTime::now_utc().date();
    let report_path = format!(
        "/admin/reports/calls?from={}&to={}&interval=day",
        today.previous_day().unwrap(),
        today.next_day().unwrap().next_day().unwrap()
    );
    until(
        "node B's report counts node A's ticket call",
        Duration::from_secs(10),
        async || {
            let (code, body) = http(b.http_addr, "GET", &report_path, &[], b"").await;
            (code == 200)
                .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
                .flatten()
                .filter(|v| v["total"]["tickets"] == 1)
        },
    )
    .await;

    // A 911 caller on node B: the audit row is in the shared store, read from node A.
    let mut ua = TestUa::udp(b.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("19").await; // English, then 9 at screening
    until(
        "node A sees node B's 911 audit",
        Duration::from_secs(10),
        async || {
            let rows = a.tickets.emergency_audits(10).await.unwrap();
            (rows.len() == 1).then_some(rows)
        },
    )
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn when_postgresql_goes_away_callers_hear_the_apology_the_node_is_not_ready_and_it_comes_back(
) {
    let mut pg = Postgres::start();
    let srv = node(&pg, agents_config(&["1001"], 20, 2)).await;
    let agent = TestAgent::login(srv.sip_addr, "1001").await;
    until_ready_code(srv.http_addr, 200, Duration::from_secs(10)).await;

    pg.kill();
    // Not ready, and the edge's probe is told so.
    until_ready_code(srv.http_addr, 503, Duration::from_secs(15)).await;
    until(
        "OPTIONS answered 503",
        Duration::from_secs(10),
        async || {
            options_probe(srv.sip_addr, Duration::from_secs(2))
                .await
                .filter(|r| r.code == 503)
        },
    )
    .await;

    // A caller still gets through the menu, hears the apology and is offered the operator,
    // and never hears a number that was not stored.
    let (mut ua, got) = file_pothole(srv.sip_addr, Duration::from_millis(12_000)).await;
    let apology = got.iter().position(|p| p == "db_error");
    let hold = got.iter().position(|p| p == "operator_queue");
    assert!(
        apology.is_some() && hold > apology,
        "told, then put through to the operator: heard {got:?}"
    );
    assert!(!got.contains(&"ticket_filed".to_owned()), "heard {got:?}");
    let inv = agent.request("INVITE", Duration::from_secs(10)).await;
    agent.reply(&inv, 180, "Ringing", None).await;
    ua.bye().await;
    let cancel = agent.request("CANCEL", Duration::from_secs(5)).await;
    agent.reply(&cancel, 200, "OK", None).await;
    agent.reply(&inv, 487, "Request Terminated", None).await;

    // The database comes back: the node is ready again by itself and the next caller files.
    pg.restart();
    until_ready_code(srv.http_addr, 200, Duration::from_secs(20)).await;
    let (mut ua2, got) = file_pothole(srv.sip_addr, Duration::from_millis(3000)).await;
    assert!(
        got.contains(&"ticket_filed".to_owned()) && !got.contains(&"db_error".to_owned()),
        "after recovery heard {got:?}"
    );
    ua2.bye().await;
    let all = srv.tickets.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 1, "only the ticket that was read back: {all:?}");
    assert_eq!(all[0].call_id.as_deref(), Some(ua2.call_id.as_str()));
    srv.shutdown().await;
}
