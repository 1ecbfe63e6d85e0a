//! The operator console's HTTP API against the real server: log-in, sessions and their
//! limits, CSRF, an operator's states honoured by the queue, the offer event with the
//! caller's context and history after a SIP caller presses 0, and tickets filed from the
//! console found over Open311.

mod common;

use common::*;
use ivr311::dispatch::tickets::{Channel, NewTicket};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// `POST /console/login` with any password: (status, head, body).
async fn login_raw(http: SocketAddr, agent: &str, password: &str) -> (u16, String, String) {
    http_head(
        http,
        "POST",
        "/console/login",
        &[("Content-Type", "application/json")],
        json!({"agent": agent, "password": password})
            .to_string()
            .as_bytes(),
    )
    .await
}

/// Poll agent `id`'s state in `/admin/agents` until it is `want`.
async fn until_state(http: SocketAddr, id: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = agent_state(http, id).await;
        if s == want || Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin_agent(http: SocketAddr, id: &str) -> Value {
    let (_, body) = common::http(http, "GET", "/admin/agents", &[], b"").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn an_operator_logs_in_with_a_strict_cookie_and_a_wrong_password_is_refused() {
    let srv = start_server(agents_config(&["1001"], 20, 5)).await;
    let (status, _, body) = login_raw(srv.http_addr, "1001", "wrong").await;
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = login_raw(srv.http_addr, "9999", "pw9999").await;
    assert_eq!(status, 401, "an unknown agent");
    let (status, head, _) = login_raw(srv.http_addr, "1001", "pw1001").await;
    assert_eq!(status, 200);
    let cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "no Secure without console.secure_cookies"
    );

    let c = ConsoleSession::login(srv.http_addr, "1001").await;
    let (status, me) = c.get("/console/api/session").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["agent"], "1001");
    assert_eq!(me["csrf_token"], c.csrf.as_str());
    assert_eq!(
        me["not_ready_reasons"],
        json!(["break", "lunch", "training", "after_call_work"])
    );
    assert!(me["services"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["service_code"] == "pothole"));
    // Without the cookie, or after log-out, nothing.
    let (status, _, _) = http_head(srv.http_addr, "GET", "/console/api/session", &[], b"").await;
    assert_eq!(status, 401);
    let (status, _) = c.post("/console/logout", json!({})).await;
    assert_eq!(status, 204);
    assert_eq!(c.get("/console/api/session").await.0, 401);
    // The page itself is served to anyone, with a strict content policy.
    let (status, head, body) = http_head(srv.http_addr, "GET", "/console", &[], b"").await;
    assert_eq!(status, 200);
    assert!(body.contains("console.js"), "{body}");
    assert!(head
        .to_ascii_lowercase()
        .contains("content-security-policy"));
    srv.shutdown().await;
}

#[tokio::test]
async fn log_ins_are_refused_after_repeated_failures_per_id_and_per_address() {
    let mut file = agents_config(&["1001", "1002"], 20, 5);
    file.console.login_max_failures = 3;
    let srv = start_server(file).await;
    for _ in 0..3 {
        assert_eq!(login_raw(srv.http_addr, "1001", "guess").await.0, 401);
    }
    // Even the right password is refused now, with a time to come back.
    let (status, head, _) = login_raw(srv.http_addr, "1001", "pw1001").await;
    assert_eq!(status, 429);
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    // This address has used its failures too: another id is refused from here.
    assert_eq!(login_raw(srv.http_addr, "1002", "pw1002").await.0, 429);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_state_change_without_the_csrf_token_is_refused() {
    let srv = start_server(agents_config(&["1001"], 20, 5)).await;
    let _phone = TestAgent::login(srv.sip_addr, "1001").await;
    assert_eq!(
        until_state(srv.http_addr, "1001", "available").await,
        "available"
    );
    let c = ConsoleSession::login(srv.http_addr, "1001").await;
    let body = json!({"state": "not_ready", "reason": "break"}).to_string();
    for headers in [
        vec![
            ("Cookie", c.cookie.as_str()),
            ("Content-Type", "application/json"),
        ],
        vec![
            ("Cookie", c.cookie.as_str()),
            ("Content-Type", "application/json"),
            ("X-CSRF-Token", "0000"),
        ],
    ] {
        let (status, _, b) = http_head(
            srv.http_addr,
            "POST",
            "/console/api/state",
            &headers,
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 403, "{b}");
    }
    assert_eq!(agent_state(srv.http_addr, "1001").await, "available");
    // A form post (what a cross-site page could send) is refused even with the token.
    let (status, _, _) = http_head(
        srv.http_addr,
        "POST",
        "/console/api/state",
        &[
            ("Cookie", c.cookie.as_str()),
            ("X-CSRF-Token", c.csrf.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        b"state=logged_out",
    )
    .await;
    assert_eq!(status, 415);
    // A reason the config does not list is refused.
    let (status, _) = c
        .post(
            "/console/api/state",
            json!({"state": "not_ready", "reason": "nap"}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, v) = c
        .post(
            "/console/api/state",
            json!({"state": "not_ready", "reason": "break"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let a = admin_agent(srv.http_addr, "1001").await;
    assert_eq!(
        (a["state"].as_str(), a["pause_reason"].as_str()),
        (Some("paused"), Some("break"))
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn a_not_ready_operator_is_skipped_and_logged_out_stays_out_while_the_phone_registers() {
    let srv = start_server(agents_config(&["1001", "1002"], 20, 5)).await;
    let first = TestAgent::login(srv.sip_addr, "1001").await;
    let second = TestAgent::login(srv.sip_addr, "1002").await;
    assert_eq!(
        until_state(srv.http_addr, "1002", "available").await,
        "available"
    );
    let c = ConsoleSession::login(srv.http_addr, "1001").await;
    let (status, v) = c
        .post(
            "/console/api/state",
            json!({"state": "not_ready", "reason": "lunch"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "paused");

    // 1001 is first in the config (longest idle since the same login second) but not
    // ready: the caller rings 1002.
    let _caller = caller_pressing(srv.sip_addr, "110").await;
    let inv = second.request("INVITE", Duration::from_secs(5)).await;
    assert!(inv.header("X-311-Queue").is_some());
    assert!(
        first.recv(Duration::from_millis(300)).await.is_none(),
        "1001 was rung"
    );
    second.reply(&inv, 486, "Busy Here", None).await;

    // The caller waits (1002 rests after its busy); logged out at the console, 1001 stays
    // out of the queues though its phone is registered, and a fresh REGISTER does not bring
    // it back.
    let (status, v) = c
        .post("/console/api/state", json!({"state": "logged_out"}))
        .await;
    assert_eq!(status, 200, "{v}");
    let again = TestAgent::login(srv.sip_addr, "1001").await;
    let a = admin_agent(srv.http_addr, "1001").await;
    assert_eq!(a["state"], "logged_out", "{a}");
    assert_eq!(a["signed_off"], true, "{a}");
    assert!(
        again.recv(Duration::from_millis(300)).await.is_none(),
        "rung while logged out"
    );
    // Ready again: the waiting caller rings 1001 at once.
    let (status, v) = c
        .post("/console/api/state", json!({"state": "ready"}))
        .await;
    assert_eq!(status, 200, "{v}");
    let inv = again.request("INVITE", Duration::from_secs(5)).await;
    assert!(inv.header("X-311-Queue").is_some());
    assert_eq!(agent_state(srv.http_addr, "1001").await, "ringing");
    srv.shutdown().await;
}

#[tokio::test]
async fn the_offer_event_carries_the_callers_context_and_history_and_decline_moves_on() {
    let srv = start_server(agents_config(&["1001", "1002"], 20, 30)).await;
    // The caller's earlier requests: one within 90 days, one from another number.
    let earlier = srv
        .tickets
        .file(NewTicket {
            service_code: "streetlight".into(),
            service_name: "Streetlight out".into(),
            phone: Some("+15550001111".into()),
            zipcode: Some("10458".into()),
            ..NewTicket::default()
        })
        .await
        .unwrap();
    srv.tickets
        .file(NewTicket {
            service_code: "graffiti".into(),
            service_name: "Graffiti".into(),
            phone: Some("+15559999999".into()),
            ..NewTicket::default()
        })
        .await
        .unwrap();
    let phone = TestAgent::login(srv.sip_addr, "1001").await;
    let c = ConsoleSession::login(srv.http_addr, "1001").await;
    let other = ConsoleSession::login(srv.http_addr, "1002").await;
    let mut events = c.events("/console/events").await;
    let snap = events.next("snapshot", Duration::from_secs(5)).await;
    assert_eq!(snap["state"]["state"], "available", "{snap}");

    let mut caller = caller_pressing(srv.sip_addr, "110").await;
    let offer = events.next("offer", Duration::from_secs(10)).await;
    assert_eq!(offer["number"], "+15550001111", "{offer}");
    assert_eq!(offer["language"], "en");
    assert_eq!(offer["queue"], "general");
    assert_eq!(offer["menu_words"], "Operator");
    assert_eq!(offer["callback"], false);
    assert!(offer["waited_seconds"].as_u64().is_some());
    let history = offer["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{offer}");
    assert_eq!(
        history[0]["service_request_id"],
        earlier.service_request_id.to_string()
    );
    assert_eq!(history[0]["service_name"], "Streetlight out");
    assert_eq!(history[0]["status"], "open");
    let inv = phone.request("INVITE", Duration::from_secs(5)).await;
    phone.reply(&inv, 180, "Ringing", None).await;
    let ringing = events.next("state", Duration::from_secs(5)).await;
    assert_eq!(ringing["state"], "ringing", "{ringing}");
    let caller_id = offer["caller"].clone();

    // Another operator's session cannot decline it, nor name an agent.
    let (status, _) = other
        .post("/console/api/offer/decline", json!({"caller": caller_id}))
        .await;
    assert_eq!(status, 409);
    let (status, _) = other
        .post(
            "/console/api/state",
            json!({"state": "logged_out", "agent": "1001"}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = other.post("/console/api/call/hangup", json!({})).await;
    assert_eq!(status, 409);
    assert_eq!(agent_state(srv.http_addr, "1001").await, "ringing");

    // Declined from the page: the phone stops ringing (CANCEL) and the agent rests as after
    // no answer.
    let (status, v) = c
        .post("/console/api/offer/decline", json!({"caller": caller_id}))
        .await;
    assert_eq!(status, 204, "{v}");
    phone.request("CANCEL", Duration::from_secs(5)).await;
    loop {
        let s = events.next("state", Duration::from_secs(5)).await;
        if s["state"] == "no_answer_pause" {
            break;
        }
    }
    caller.bye().await;
    srv.shutdown().await;
}

/// A caller who chose a service and typed its ZIP code, then pressed 0 at the recording step,
/// reaches the operator with both: the offer carries them for the page's ticket form.
#[tokio::test]
async fn the_service_and_zip_a_caller_entered_before_pressing_0_reach_the_operators_offer() {
    let srv = start_server(agents_config(&["1001"], 20, 30)).await;
    let _phone = TestAgent::login(srv.sip_addr, "1001").await;
    let c = ConsoleSession::login(srv.http_addr, "1001").await;
    let mut events = c.events("/console/events").await;
    events.next("snapshot", Duration::from_secs(5)).await;
    // English, past the 911 warning, streets, pothole; the ZIP; then 0 for an operator.
    let caller = caller_pressing(srv.sip_addr, "1111104580").await;
    let offer = events.next("offer", Duration::from_secs(10)).await;
    assert_eq!(offer["service_code"], "pothole", "{offer}");
    assert_eq!(offer["zipcode"], "10458", "{offer}");
    assert_eq!(
        offer["menu_words"], "Streets and infrastructure > Pothole > Operator",
        "{offer}"
    );
    // The snapshot a reloaded page reads says the same.
    let (_, session) = c.get("/console/api/session").await;
    assert_eq!(session["offer"]["zipcode"], "10458", "{session}");
    drop(caller);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_ticket_filed_from_the_console_is_found_over_open311_with_channel_operator() {
    let srv = start_server(agents_config(&["1001"], 20, 5)).await;
    let phone = TestAgent::login(srv.sip_addr, "1001").await;
    let c = ConsoleSession::login(srv.http_addr, "1001").await;
    let mut events = c.events("/console/events").await;
    events.next("snapshot", Duration::from_secs(5)).await;
    let mut caller = caller_pressing(srv.sip_addr, "110").await;
    let inv = phone.request("INVITE", Duration::from_secs(5)).await;
    phone.reply(&inv, 200, "OK", Some(phone.answer_sdp())).await;
    phone.request("ACK", Duration::from_secs(3)).await;
    loop {
        if events.next("state", Duration::from_secs(5)).await["state"] == "on_call" {
            break;
        }
    }

    // A bad service is refused; a good one is filed with the caller's number.
    let (status, _) = c
        .post("/console/api/requests", json!({"service_code": "nope"}))
        .await;
    assert_eq!(status, 400);
    let (status, t) = c
        .post(
            "/console/api/requests",
            json!({
                "service_code": "pothole",
                "address": "100 Main St",
                "zipcode": "10458",
                "description": "Deep pothole in the right lane",
            }),
        )
        .await;
    assert_eq!(status, 201, "{t}");
    let id = t["service_request_id"].as_str().unwrap().to_owned();
    assert_eq!(t["channel"], "operator");
    assert_eq!(t["agent_id"], "1001");
    assert_eq!(t["phone"], "+15550001111");

    let (status, body) = common::http(
        srv.http_addr,
        "GET",
        &format!("/open311/v2/requests/{id}.json"),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let public: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(public[0]["service_code"], "pothole");
    assert_eq!(public[0]["address"], "100 Main St");
    assert!(
        !body.contains("+15550001111"),
        "no caller's number in Open311"
    );
    let stored = srv.tickets.get(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(stored.channel, Channel::Operator);
    assert_eq!(stored.agent_id.as_deref(), Some("1001"));

    // Updated from the console, seen over Open311.
    let (status, u) = c
        .post(
            &format!("/console/api/requests/{id}"),
            json!({"status": "closed", "status_notes": "Crew sent"}),
        )
        .await;
    assert_eq!(status, 200, "{u}");
    let (_, body) = common::http(
        srv.http_addr,
        "GET",
        &format!("/open311/v2/requests/{id}.json"),
        &[],
        b"",
    )
    .await;
    let public: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(public[0]["status"], "closed", "{body}");

    // Hang up from the console: the caller gets BYE, the page hears the call end, and the
    // operator can end wrap-up early.
    let (status, v) = c.post("/console/api/call/hangup", json!({})).await;
    assert_eq!(status, 204, "{v}");
    caller.expect_request("BYE", Duration::from_secs(5)).await;
    events.next("call_ended", Duration::from_secs(5)).await;
    assert_eq!(
        until_state(srv.http_addr, "1001", "wrap_up").await,
        "wrap_up"
    );
    let (status, v) = c
        .post("/console/api/wrap-up/extend", json!({"seconds": 120}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["seconds_left"].as_u64().unwrap() > 100, "{v}");
    let (status, v) = c.post("/console/api/wrap-up/end", json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "available");
    srv.shutdown().await;
}

#[tokio::test]
async fn the_911_button_sends_the_caller_to_911_with_their_number() {
    let psap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("sip:911@{}", psap.local_addr().unwrap());
    let mut file = agents_config(&["1001"], 20, 5);
    file.emergency = bridge_911_to(&uri).emergency;
    // The caller comes through a trusted trunk that asserts their number.
    file.trunks.allow = vec!["127.0.0.1".parse().unwrap()];
    let srv = start_server(file).await;
    let phone = TestAgent::login(srv.sip_addr, "1001").await;
    let c = ConsoleSession::login(srv.http_addr, "1001").await;
    // Not on a call: nothing to transfer.
    let (status, _) = c
        .post("/console/api/call/transfer", json!({"to": "911"}))
        .await;
    assert_eq!(status, 409);
    let mut caller = TestUa::udp(srv.sip_addr).await;
    let (_, ok) = caller
        .call_with(
            "0 101",
            "P-Asserted-Identity: <sip:+15550001111@127.0.0.1>\r\n",
        )
        .await;
    assert_eq!(ok.code, 200);
    caller.listen(Duration::from_millis(200)).await;
    caller.keys("110").await;
    let inv = phone.request("INVITE", Duration::from_secs(5)).await;
    phone.reply(&inv, 200, "OK", Some(phone.answer_sdp())).await;
    phone.request("ACK", Duration::from_secs(3)).await;
    assert_eq!(
        until_state(srv.http_addr, "1001", "on_call").await,
        "on_call"
    );
    // A number outside the dial plan is refused (operators cannot dial out through the city's
    // trunk), and the call goes on.
    let (status, _) = c
        .post("/console/api/call/transfer", json!({"to": "555"}))
        .await;
    assert_eq!(status, 403);

    let (status, v) = c
        .post("/console/api/call/transfer", json!({"to": "911"}))
        .await;
    assert_eq!(status, 202, "{v}");
    // The 911 centre is called with the caller's number, while the operator stays on the line
    // until it answers.
    let mut buf = vec![0u8; 65535];
    let invite = loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), psap.recv_from(&mut buf))
            .await
            .expect("an INVITE to 911")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.starts_with("INVITE ") {
            break text;
        }
    };
    assert!(invite.contains("+15550001111"), "{invite}");
    assert_eq!(
        until_state(srv.http_addr, "1001", "on_call").await,
        "on_call"
    );
    // The audit names the operator and that they asked from the console; so does the
    // transfer's progress, which only this operator's session may read.
    let (_, audit) = common::http(srv.http_addr, "GET", "/admin/emergency", &[], b"").await;
    assert!(
        audit.contains("operator 1001 transferred the caller (console)"),
        "{audit}"
    );
    let progress = v["progress"].as_str().expect("a progress URL").to_owned();
    let (status, t) = c.get(&progress).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["target"], "911", "{t}");
    srv.shutdown().await;
}
