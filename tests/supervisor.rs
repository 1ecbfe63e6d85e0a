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
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request: (status, head, body).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
    (status, head.to_owned(), body.to_owned())
}

/// A logged-in session (the console's log-in): its cookie and CSRF token.
struct Session {
    http: SocketAddr,
    cookie: String,
    csrf: String,
}

impl Session {
    async fn login(http: SocketAddr, agent: &str) -> Session {
        let (status, head, body) = request(
            http,
            "POST",
            "/console/login",
            &[("Content-Type", "application/json")],
            &json!({"agent": agent, "password": format!("pw{agent}")}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{head}\n{body}");
        let cookie = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
            .and_then(|l| l.split_once(':'))
            .and_then(|(_, v)| v.trim().split(';').next())
            .expect("a session cookie")
            .to_owned();
        let body: Value = serde_json::from_str(&body).unwrap();
        Session {
            http,
            cookie,
            csrf: body["csrf_token"].as_str().unwrap().to_owned(),
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (status, _, body) =
            request(self.http, "GET", path, &[("Cookie", &self.cookie)], "").await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn post_with(&self, path: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
        let mut h = vec![("Cookie", self.cookie.as_str())];
        h.extend_from_slice(headers);
        let (status, _, body) = request(self.http, "POST", path, &h, &body.to_string()).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_with(
            path,
            &[
                ("X-CSRF-Token", &self.csrf),
                ("Content-Type", "application/json"),
            ],
            body,
        )
        .await
    }

    async fn events(&self) -> Events {
        let mut s = TcpStream::connect(self.http).await.unwrap();
        let req = format!(
            "GET /supervisor/events HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\nAccept: text/event-stream\r\n\r\n",
            self.http, self.cookie
        );
        s.write_all(req.as_bytes()).await.unwrap();
        Events {
            stream: s,
            text: String::new(),
            at: 0,
            name: None,
        }
    }
}

/// A server-sent events stream, read line by line (chunk-size lines are skipped).
struct Events {
    stream: TcpStream,
    text: String,
    at: usize,
    name: Option<String>,
}

impl Events {
    /// The first `snapshot` for which `pred` holds, within `within`.
    async fn snapshot_where(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        let mut last = Value::Null;
        loop {
            while let Some(end) = self.text[self.at..].find('\n') {
                let line = self.text[self.at..self.at + end].trim_end().to_owned();
                self.at += end + 1;
                if let Some(n) = line.strip_prefix("event:") {
                    self.name = Some(n.trim().to_owned());
                } else if let Some(d) = line.strip_prefix("data:") {
                    if self.name.take().as_deref() == Some("snapshot") {
                        last = serde_json::from_str(d.trim()).unwrap();
                        if pred(&last) {
                            return last;
                        }
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut buf = [0u8; 16384];
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => panic!("no such snapshot within {within:?}; the last:\n{last:#}"),
            }
        }
    }
}

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
    let (status, head, _) = request(http, "GET", "/supervisor", &[], "").await;
    assert_eq!(status, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("content-security-policy"));
    let (status, _, _) = request(http, "GET", "/supervisor/api/wallboard", &[], "").await;
    assert_eq!(status, 401);
    let (status, _, _) = request(
        http,
        "POST",
        "/supervisor/api/agents/1001/state",
        &[("Content-Type", "application/json")],
        r#"{"state": "ready"}"#,
    )
    .await;
    assert_eq!(status, 401);

    // An operator's session: 403 everywhere, reads and actions alike.
    let op = Session::login(http, "1001").await;
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
    let sup = Session::login(http, "2001").await;
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
    let sup = Session::login(http, "2001").await;
    let mut events = sup.events().await;
    let first = events
        .snapshot_where(Duration::from_secs(5), |_| true)
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
        .snapshot_where(Duration::from_secs(10), |b| {
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
        .snapshot_where(Duration::from_secs(10), |b| !has_alarm(b, "no_agent_ready"))
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
    let sup = Session::login(http, "2001").await;
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
