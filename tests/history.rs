//! Call history and reports, through SIP: calls placed by test phones (one answered by a test
//! operator, one abandoned in the queue, one ticketed in the IVR, one sent to 911) give the
//! exact counts and service level in `/admin/reports/calls`, and the same report after a
//! restart on the same database.

mod common;

use common::*;
use ivr311::config::FileConfig;
use serde_json::Value;
use std::time::{Duration, SystemTime};

fn config() -> FileConfig {
    let mut f = agents_config(&["1001"], 20, 30);
    // A short wrap-up, over before the report is read (it is part of the handle time).
    f.queues[0].wrap_up_seconds = 1;
    // Every unanswered caller counts as abandoned, however short the wait.
    f.reports.short_abandon_seconds = 0;
    f
}

fn iso(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

async fn get_json(http_addr: std::net::SocketAddr, path: &str) -> Value {
    let (status, body) = http(http_addr, "GET", path, &[], b"").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// The report once it counts `calls` calls (the history is written off the calls' path).
async fn report_with(http_addr: std::net::SocketAddr, path: &str, calls: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = get_json(http_addr, path).await;
        if r["total"]["calls"].as_u64() == Some(calls) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the report never counted {calls} calls: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn until_waiting(http_addr: std::net::SocketAddr, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let q = get_json(http_addr, "/admin/queues").await;
        if q[0]["waiting"].as_u64() == Some(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} waiting: {q}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn calls_through_sip_give_exact_counts_and_the_same_report_after_a_restart() {
    let args = serve_args();
    let srv = start_server_with(args.clone(), config()).await;
    let now = SystemTime::now();
    let (from, to) = (
        iso(now - Duration::from_secs(3600)),
        iso(now + Duration::from_secs(7200)),
    );
    let calls_path = format!("/admin/reports/calls?from={from}&to={to}&interval=day");
    // Whole days: read from the rollup the writer keeps, not the rows.
    let days_path = format!(
        "/admin/reports/calls?from={}&to={}&interval=hour",
        &iso(now - Duration::from_secs(86_400))[..10],
        &iso(now + Duration::from_secs(2 * 86_400))[..10],
    );
    let agents_path = format!("/admin/reports/agents?from={from}&to={to}&interval=day");

    // 1. Answered by the operator.
    let agent = TestAgent::login(srv.sip_addr, "1001").await;
    let mut answered = caller_pressing(srv.sip_addr, "110").await;
    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    agent.reply(&inv, 200, "OK", Some(agent.answer_sdp())).await;
    agent.request("ACK", Duration::from_secs(3)).await;

    // 2. Abandoned in the queue: the only operator is on the first call.
    let mut abandoning = caller_pressing(srv.sip_addr, "110").await;
    until_waiting(srv.http_addr, 1).await;
    abandoning.bye().await;
    until_waiting(srv.http_addr, 0).await;
    answered.bye().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while agent_state(srv.http_addr, "1001").await != "available" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "wrap-up never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 3. A pothole ticket filed in the IVR.
    let mut ticketing = caller_pressing(srv.sip_addr, "1111").await;
    ticketing.keys("94103").await;
    until_recording(&mut ticketing, &srv).await;
    ticketing.speak(25).await;
    ticketing.press('#').await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while srv
        .tickets
        .list(&Default::default())
        .await
        .unwrap()
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "no ticket filed");
        ticketing.listen(Duration::from_millis(100)).await;
    }
    let ticket = srv.tickets.list(&Default::default()).await.unwrap()[0].service_request_id;
    ticketing.bye().await;

    // 4. Sent to 911 (announced: no 911 route configured); the server hangs up.
    let mut emergency = caller_pressing(srv.sip_addr, "19").await;
    emergency
        .expect_request("BYE", Duration::from_secs(20))
        .await;

    let r = report_with(srv.http_addr, &calls_path, 4).await;
    let t = &r["total"];
    assert_eq!(r["rows"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(t["answered_by_ivr"], 4, "{t}");
    assert_eq!(t["rejected"], 0, "{t}");
    assert_eq!(t["offered"], 2, "{t}");
    assert_eq!(t["answered"], 1, "{t}");
    assert_eq!(t["abandoned"], 1, "{t}");
    assert_eq!(t["short_abandoned"], 0, "{t}");
    assert_eq!(t["answered_within_target"], 1, "{t}");
    // 1 answered within 30 s ÷ (2 offered − 0 short abandons).
    assert_eq!(t["service_level"], 0.5, "{t}");
    assert_eq!(t["emergency_redirects"], 1, "{t}");
    assert_eq!(t["tickets"], 1, "{t}");
    assert_eq!(t["tickets_by_service"]["pothole"], 1, "{t}");
    assert_eq!(t["self_service"], 1, "{t}");
    assert_eq!(t["self_service_rate"], 0.25, "{t}");
    assert!(t["asa_seconds"].as_f64().unwrap() < 30.0, "{t}");
    // Talk plus the one-second wrap-up.
    assert!(t["aht_seconds"].as_f64().unwrap() >= 1.0, "{t}");
    assert!(t["longest_wait_seconds"].as_f64().unwrap() > 0.0, "{t}");

    let days = get_json(srv.http_addr, &days_path).await;
    assert_eq!(days["total"], r["total"], "the rollup agrees with the rows");

    // The operator's figures agree: one call, talk time, logged in.
    let a = report_with_agent(srv.http_addr, &agents_path).await;
    let row = a["totals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent"] == "1001")
        .cloned()
        .unwrap_or_else(|| panic!("no 1001 in {a}"));
    assert_eq!(row["calls"], 1, "{row}");
    assert!(row["talk_seconds"].as_f64().unwrap() > 0.0, "{row}");

    // The rows themselves: the ticket's number and the 911 audit row are kept with the call,
    // and the queue's events as queue_log has them, each with its call.
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", args.db.display()))
        .await
        .unwrap();
    let calls: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT outcome, ticket_id, emergency_audit_id FROM call_history ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let events: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT event, call_id, agent FROM queue_events ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap();
    db.close().await;
    let of = |call_id: &str| -> Vec<&str> {
        events
            .iter()
            .filter(|(_, c, _)| c.as_deref() == Some(call_id))
            .map(|(e, _, _)| e.as_str())
            .collect()
    };
    assert_eq!(
        of(&answered.call_id),
        ["enter", "offer", "answer", "complete"],
        "{events:?}"
    );
    assert_eq!(of(&abandoning.call_id), ["enter", "abandon"], "{events:?}");
    assert!(
        calls.contains(&("ticket".into(), Some(ticket as i64), None)),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|(o, _, audit)| o == "emergency" && audit.is_some()),
        "{calls:?}"
    );

    // CSV: the same total.
    let (status, csv) = http(
        srv.http_addr,
        "GET",
        &format!("{calls_path}&format=csv"),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let total = csv.lines().find(|l| l.starts_with("total,")).unwrap();
    assert!(
        total.starts_with("total,4,4,0,2,1,1,0,1,0.5000,"),
        "{total}"
    );

    srv.shutdown().await;
    let srv = start_server_with(args, config()).await;
    let again = get_json(srv.http_addr, &calls_path).await;
    assert_eq!(again, r, "the report after a restart");
    assert_eq!(get_json(srv.http_addr, &days_path).await, days);
    srv.shutdown().await;
}

async fn report_with_agent(http_addr: std::net::SocketAddr, path: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = get_json(http_addr, path).await;
        let has = r["totals"]
            .as_array()
            .is_some_and(|t| t.iter().any(|a| a["agent"] == "1001" && a["calls"] == 1));
        if has {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no operator row: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn reports_need_the_admin_token_and_refuse_bad_ranges() {
    let mut file = config();
    file.admin.token = Some("s3cret-token".into());
    let srv = start_server(file).await;
    let (status, _) = http(srv.http_addr, "GET", "/admin/reports/calls", &[], b"").await;
    assert_eq!(status, 403);
    let auth = [("Authorization", "Bearer s3cret-token")];
    let (status, body) = http(srv.http_addr, "GET", "/admin/reports/calls", &auth, b"").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        srv.http_addr,
        "GET",
        "/admin/reports/calls?from=2026-12-01&to=2026-11-01",
        &auth,
        b"",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(
        srv.http_addr,
        "GET",
        "/admin/reports/calls?from=last-tuesday",
        &auth,
        b"",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("from"), "{body}");
    srv.shutdown().await;
}

#[tokio::test]
async fn refused_calls_and_callers_who_give_up_ringing_are_in_the_history() {
    let mut file = FileConfig::default();
    file.limits.max_calls = 1;
    // Ring before answering, so a caller can give up while it rings.
    file.media.answer_after_ms = 1000;
    let srv = start_server(file).await;
    let mut first = TestUa::udp(srv.sip_addr).await;
    assert_eq!(first.call("0 101").await.code, 200);
    // The limit is reached: 503.
    let mut second = TestUa::udp(srv.sip_addr).await;
    assert_eq!(second.call("0 101").await.code, 503);
    first.bye().await;
    // A caller who hangs up while it rings: CANCEL before the answer.
    let mut third = TestUa::udp(srv.sip_addr).await;
    let invite = third.invite_bytes(&third.offer("0 101"));
    third.send_raw(&invite).await;
    third
        .expect_response("INVITE", 180, Duration::from_secs(5))
        .await;
    let cancel = format!(
        "CANCEL sip:311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch={br};rport\r\n\
Max-Forwards: 70\r\nFrom: \"Test Caller\" <sip:+15550001111@{me}>;tag={tag}\r\n\
To: <sip:311@{srv}>\r\nCall-ID: {cid}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n",
        srv = srv.sip_addr,
        me = third.local,
        br = third.invite_branch,
        tag = third.from_tag,
        cid = third.call_id
    );
    third.send_raw(cancel.as_bytes()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no 487");
        if let Some(ivr311::sip::message::Message::Response(r)) =
            third.recv(Duration::from_millis(500)).await
        {
            if r.cseq_method.to_string() == "INVITE" && r.code == 487 {
                break;
            }
        }
    }

    let r = report_with(srv.http_addr, "/admin/reports/calls", 3).await;
    let t = &r["total"];
    assert_eq!(t["rejected"], 1, "{t}");
    assert_eq!(t["answered_by_ivr"], 1, "{t}");
    assert_eq!(t["offered"], 0, "{t}");
    // The caller who gave up is an abandoned call, not a refused one: calls − answered −
    // rejected.
    assert_eq!(t["calls"], 3, "{t}");
    srv.shutdown().await;
}
