//! The supervisor's wallboard API against the real server: the supervisor role enforced on
//! the console's sessions, CSRF, the live snapshot carrying a SIP caller waiting in the queue
//! and the no-agent-ready alarm, an agent's state forced from the wallboard and honoured by the
//! queue, and a call hung up from the wallboard (the caller's phone gets the BYE).

mod common;

use common::*;
use ivr311::config::AgentRole;
use ivr311::server::RunningServer;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

/// Operator 1001 and supervisor 2001 (passwords `pw<id>`), one `general` queue.
async fn server() -> RunningServer {
    let mut file = agents_config(&["1001", "2001"], 20, 5);
    file.agents[1].role = AgentRole::Supervisor;
    start_server(file).await
}

/// Wait until agent `id`'s phone has registered and it is available.
async fn available(http: SocketAddr, id: &str) {
    until("the agent available", Duration::from_secs(10), async || {
        (agent_state(http, id).await == "available").then_some(())
    })
    .await;
}

fn queue<'a>(board: &'a Value, name: &str) -> &'a Value {
    board["queues"]
        .as_array()
        .and_then(|q| q.iter().find(|q| q["name"] == name))
        .unwrap_or(&Value::Null)
}

fn has_alarm(board: &Value, kind: &str) -> bool {
    board["alarms"].as_array().is_some_and(|a| {
        a.iter()
            .any(|a| a["kind"] == kind && a["queue"] == "general")
    })
}

#[tokio::test]
async fn only_a_supervisors_session_reaches_the_wallboard_and_changes_need_the_csrf_token() {
    let srv = server().await;
    let http = srv.http_addr;
    // The page itself is public (it shows the log-in); its API is not.
    let (status, head, _) = http_head(http, "GET", "/supervisor", &[], b"").await;
    assert_eq!(status, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("content-security-policy"));
    let (status, _, _) = http_head(http, "GET", "/supervisor/api/wallboard", &[], b"").await;
    assert_eq!(status, 401);
    let (status, _, _) = http_head(
        http,
        "POST",
        "/supervisor/api/agents/1001/state",
        &[("Content-Type", "application/json")],
        br#"{"state": "ready"}"#,
    )
    .await;
    assert_eq!(status, 401);

    // An operator's session: 403 everywhere, reads and actions alike.
    let op = ConsoleSession::login(http, "1001").await;
    assert_eq!(op.get("/supervisor/api/wallboard").await.0, 403);
    assert_eq!(op.get("/supervisor/events").await.0, 403);
    assert_eq!(op.get("/supervisor/api/reports/calls").await.0, 403);
    let (status, v) = op
        .post(
            "/supervisor/api/agents/2001/state",
            json!({"state": "logged_out"}),
        )
        .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(
        op.post("/supervisor/api/calls/1/hangup", json!({})).await.0,
        403
    );

    // A supervisor's: the wallboard, and the login says the role.
    let sup = ConsoleSession::login(http, "2001").await;
    let (status, me) = sup.get("/supervisor/api/session").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["role"], "supervisor");
    assert_eq!(me["csrf_token"], sup.csrf.as_str());
    let (status, board) = sup.get("/supervisor/api/wallboard").await;
    assert_eq!(status, 200, "{board}");
    assert_eq!(queue(&board, "general")["waiting"], 0, "{board}");
    assert_eq!(queue(&board, "general")["service_level_target"], 0.8);
    let roles: Vec<(&str, &str)> = board["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_str().unwrap(), a["role"].as_str().unwrap()))
        .collect();
    assert_eq!(roles, [("1001", "operator"), ("2001", "supervisor")]);

    // Changes without the session's CSRF token, or not as JSON, are refused and change nothing.
    let _phone = TestAgent::login(srv.sip_addr, "1001").await;
    available(http, "1001").await;
    let body = json!({"state": "not_ready", "reason": "lunch"});
    let (status, _) = sup
        .post_with(
            "/supervisor/api/agents/1001/state",
            &[("Content-Type", "application/json")],
            body.clone(),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = sup
        .post_with(
            "/supervisor/api/agents/1001/state",
            &[
                ("X-CSRF-Token", "0".repeat(64).as_str()),
                ("Content-Type", "application/json"),
            ],
            body.clone(),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = sup
        .post_with(
            "/supervisor/api/agents/1001/state",
            &[("X-CSRF-Token", &sup.csrf), ("Content-Type", "text/plain")],
            body.clone(),
        )
        .await;
    assert_eq!(status, 415);
    assert_eq!(agent_state(http, "1001").await, "available");
    // An unknown reason, an unknown agent.
    let (status, _) = sup
        .post(
            "/supervisor/api/agents/1001/state",
            json!({"state": "not_ready", "reason": "nap"}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = sup
        .post(
            "/supervisor/api/agents/9999/state",
            json!({"state": "ready"}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, v) = sup.post("/supervisor/api/agents/1001/state", body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "paused");
    assert_eq!(v["pause_reason"], "lunch");
    assert_eq!(agent_state(http, "1001").await, "paused");
    srv.shutdown().await;
}

#[tokio::test]
async fn the_snapshot_shows_a_waiting_caller_and_no_agent_ready_and_a_forced_ready_serves_them() {
    let srv = server().await;
    let http = srv.http_addr;
    let phone = TestAgent::login(srv.sip_addr, "1001").await;
    available(http, "1001").await;
    let sup = ConsoleSession::login(http, "2001").await;
    let mut events = sup.events("/supervisor/events").await;
    let first = events
        .next_where("snapshot", Duration::from_secs(5), |_| true)
        .await;
    assert_eq!(queue(&first, "general")["waiting"], 0, "{first}");
    assert!(first["alarms"].as_array().unwrap().is_empty(), "{first}");

    // The supervisor puts the only operator on a break.
    let (status, v) = sup
        .post(
            "/supervisor/api/agents/1001/state",
            json!({"state": "not_ready", "reason": "break"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // A caller presses 0: they wait, the wallboard shows them and the alarm, with no number.
    let mut caller = caller_pressing(srv.sip_addr, "110").await;
    let board = events
        .next_where("snapshot", Duration::from_secs(10), |b| {
            queue(b, "general")["waiting"] == 1 && has_alarm(b, "no_agent_ready")
        })
        .await;
    let q = queue(&board, "general");
    let callers = q["callers"].as_array().unwrap();
    assert_eq!(callers.len(), 1, "{board}");
    assert_eq!(callers[0]["queue"], "general");
    assert!(callers[0]["waited_seconds"].as_u64().is_some());
    assert_eq!(q["agents_ready"], 0);
    assert_eq!(q["agents_logged_in"], 1);
    let agent = board["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "1001")
        .unwrap();
    assert_eq!(agent["state"], "paused", "{agent}");
    assert_eq!(agent["pause_reason"], "break");
    assert!(agent["state_seconds"].as_u64().is_some(), "{agent}");
    assert!(
        !board.to_string().contains("+1555"),
        "the wallboard shows a caller's number: {board}"
    );
    assert!(
        phone.recv(Duration::from_millis(300)).await.is_none(),
        "a paused operator was rung"
    );

    // Forced ready from the wallboard: the queue offers the waiting caller at once.
    let (status, v) = sup
        .post(
            "/supervisor/api/agents/1001/state",
            json!({"state": "ready"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let inv = phone.request("INVITE", Duration::from_secs(5)).await;
    assert!(inv.header("X-311-Queue").is_some());
    let board = events
        .next_where("snapshot", Duration::from_secs(10), |b| {
            !has_alarm(b, "no_agent_ready")
        })
        .await;
    let agent = &board["agents"][0];
    assert_eq!(agent["state"], "ringing", "{board}");
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_call_hung_up_from_the_wallboard_ends_with_a_bye_to_the_caller() {
    let srv = server().await;
    let http = srv.http_addr;
    let _phone = TestAgent::login(srv.sip_addr, "1001").await;
    available(http, "1001").await;
    let sup = ConsoleSession::login(http, "2001").await;
    let (status, _) = sup
        .post(
            "/supervisor/api/agents/1001/state",
            json!({"state": "not_ready", "reason": "training"}),
        )
        .await;
    assert_eq!(status, 200);
    let mut caller = caller_pressing(srv.sip_addr, "110").await;
    let call = until("the caller waiting", Duration::from_secs(10), async || {
        let (_, b) = sup.get("/supervisor/api/wallboard").await;
        queue(&b, "general")["callers"][0]["caller"].as_u64()
    })
    .await;
    // Not a call id; a call that does not exist.
    assert_eq!(
        sup.post("/supervisor/api/calls/abc/hangup", json!({}))
            .await
            .0,
        400
    );
    assert_eq!(
        sup.post(
            &format!("/supervisor/api/calls/{}/hangup", call + 1000),
            json!({})
        )
        .await
        .0,
        404
    );
    let (status, v) = sup
        .post(&format!("/supervisor/api/calls/{call}/hangup"), json!({}))
        .await;
    assert_eq!(status, 204, "{v}");
    caller.expect_request("BYE", Duration::from_secs(5)).await;
    until("no caller waiting", Duration::from_secs(10), async || {
        let (_, b) = sup.get("/supervisor/api/wallboard").await;
        (queue(&b, "general")["waiting"] == 0).then_some(())
    })
    .await;
    srv.shutdown().await;
}
