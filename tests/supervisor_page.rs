//! The supervisor's wallboard and the residents' transparency page in headless Chromium
//! (Debian's `chromium` and `chromium-driver`, through [`common::browser`]): the numbers on the
//! pages equal the APIs' (`/admin/reports/calls` for today, `/admin/queues`, `/open-data/`),
//! alarms appear when callers wait with nobody ready, past the wait threshold, and when an
//! abandoned call puts the service level under its target; actions from the page reach the
//! queue and the caller's phone.
//!
//! With `IVR311_UPDATE_SCREENSHOTS=1` the screenshots are also written to `docs/` (the README
//! shows them); otherwise they stay under `target/tmp/browser-shots/`.

mod common;

use common::browser::{Browser, BrowserOptions};
use common::*;
use ivr311::config::AgentRole;
use ivr311::dispatch::tickets::{NewTicket, Status};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(20);

fn keep_screenshot(shot: &Path, name: &str) {
    if std::env::var_os("IVR311_UPDATE_SCREENSHOTS").is_some() {
        std::fs::copy(shot, repo().join("docs").join(name)).unwrap();
    }
}

async fn get_json(http: std::net::SocketAddr, path: &str) -> Value {
    let (status, body) = common::http(http, "GET", path, &[], b"").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Today's date (UTC) and tomorrow's, as the report API takes them.
fn today() -> (String, String) {
    let now = time::OffsetDateTime::now_utc().date();
    let next = now.next_day().unwrap();
    (now.to_string(), next.to_string())
}

/// The page's figure in `#id`: its exact value (`data-value`) and its text.
async fn tile(b: &Browser, id: &str) -> (String, String) {
    let v = b
        .execute(
            "const e = document.getElementById(arguments[0]); return [e.dataset.value || '', e.textContent];",
            vec![json!(id)],
        )
        .await;
    (
        v[0].as_str().unwrap().to_owned(),
        v[1].as_str().unwrap().to_owned(),
    )
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "–".into())
}

#[tokio::test]
async fn the_wallboard_shows_the_apis_numbers_and_raises_alarms_when_the_service_level_misses() {
    let mut file = agents_config(&["1001", "2001"], 20, 5);
    file.agents[1].role = AgentRole::Supervisor;
    file.queues[0].max_wait_alarm = 3;
    // Every abandon counts against the service level.
    file.reports.short_abandon_seconds = 0;
    let srv = start_server(file).await;
    let http = srv.http_addr;
    let _phone = TestAgent::login(srv.sip_addr, "1001").await;

    let b = Browser::start(BrowserOptions::default()).await;
    b.goto(&format!("http://{http}/supervisor")).await;
    b.wait_for(
        "the log-in form",
        "return !document.getElementById('login').hidden",
        WITHIN,
    )
    .await;
    b.execute(
        "document.getElementById('login-agent').value = '2001';
         document.getElementById('login-password').value = 'pw2001';
         document.getElementById('login-form').requestSubmit();",
        vec![],
    )
    .await;
    b.wait_for(
        "the operator, ready, on the live wallboard",
        "const r = document.querySelector('#agents tr[data-agent=\"1001\"] .state');
         return r && r.classList.contains('s-available');",
        WITHIN,
    )
    .await;

    // The supervisor puts the only operator on a break from the page.
    b.execute(
        "document.querySelector('#agents tr[data-agent=\"1001\"] .f-not-ready').click();",
        vec![],
    )
    .await;
    b.wait_for(
        "the operator paused",
        "const r = document.querySelector('#agents tr[data-agent=\"1001\"] .state');
         return r && r.classList.contains('s-paused');",
        WITHIN,
    )
    .await;
    assert_eq!(agent_state(http, "1001").await, "paused");

    // One caller gives up waiting (an abandon: the service level misses), another waits.
    let mut first = caller_pressing(srv.sip_addr, "110").await;
    b.wait_for(
        "the first caller waiting",
        "return document.querySelectorAll('#callers tbody tr').length === 1",
        WITHIN,
    )
    .await;
    first.bye().await;
    let mut second = caller_pressing(srv.sip_addr, "110").await;

    for kind in ["no_agent_ready", "long_wait", "service_level"] {
        b.wait_for(
            &format!("the {kind} alarm"),
            &format!("return document.querySelector('#alarms li[data-kind=\"{kind}\"]') !== null"),
            WITHIN,
        )
        .await;
    }

    // Today's figures on the page are the calls report's for today.
    let (from, to) = today();
    let report_path = format!("/admin/reports/calls?from={from}&to={to}&interval=day");
    let report = get_json(http, &report_path).await;
    let total = &report["total"];
    assert_eq!(total["offered"], 1, "{report}");
    assert_eq!(total["abandoned"], 1, "{report}");
    b.wait_for(
        "today's offered calls on the page",
        &format!(
            "return document.getElementById('t-offered').dataset.value === '{}'",
            total["offered"]
        ),
        WITHIN,
    )
    .await;
    let want = |k: &str| match &total[k] {
        Value::Null => String::new(),
        v => v.to_string(),
    };
    assert_eq!(
        tile(&b, "t-offered").await,
        (want("offered"), want("offered"))
    );
    assert_eq!(
        tile(&b, "t-answered").await,
        (want("answered"), want("answered"))
    );
    assert_eq!(
        tile(&b, "t-abandoned").await,
        (want("abandoned"), want("abandoned"))
    );
    let (sl, sl_text) = tile(&b, "t-sl").await;
    assert_eq!(sl.parse::<f64>().ok(), total["service_level"].as_f64());
    assert_eq!(sl_text, pct(&total["service_level"]));
    assert_eq!(tile(&b, "t-asa").await.0, want("asa_seconds"));

    // The queue's waiting count is the queue API's.
    let queues = get_json(http, "/admin/queues").await;
    let general = queues
        .as_array()
        .and_then(|q| q.iter().find(|q| q["name"] == "general"))
        .cloned()
        .unwrap_or_else(|| panic!("{queues}"));
    assert_eq!(general["waiting"], 1, "{queues}");
    let waiting = b
        .execute(
            "return document.querySelector('#queues tr[data-queue=\"general\"] .waiting').textContent",
            vec![],
        )
        .await;
    assert_eq!(waiting, json!(general["waiting"].to_string()));

    // The charts are drawn from the hourly report: a bar for this hour's offered call.
    b.wait_for(
        "the hourly chart",
        "return document.querySelectorAll('#chart-calls rect.offered').length === 1 &&
                document.querySelectorAll('#chart-sl rect.miss').length === 1",
        WITHIN,
    )
    .await;
    b.resize(1500, 1400).await;
    let shot = b.screenshot("wallboard").await;
    keep_screenshot(&shot, "supervisor-wallboard.png");

    // Spanish.
    b.execute("document.getElementById('lang-es').click();", vec![])
        .await;
    let title = b
        .execute("return document.querySelector('h1').textContent", vec![])
        .await;
    assert_eq!(title, "Panel de supervisión 311");

    // Hung up from the page: the waiting caller's phone gets the BYE.
    b.execute(
        "window.confirm = () => true; document.querySelector('#callers tbody tr .hangup').click();",
        vec![],
    )
    .await;
    second.expect_request("BYE", Duration::from_secs(10)).await;
    b.wait_for(
        "no caller waiting",
        "return document.querySelectorAll('#callers tbody tr').length === 0",
        WITHIN,
    )
    .await;
    drop(b);
    srv.shutdown().await;
}

#[tokio::test]
async fn the_transparency_page_shows_the_open_data_numbers() {
    let srv = start_server(ivr311::config::FileConfig::default()).await;
    let http = srv.http_addr;
    // Six pothole requests, two closed; five calls hung up in the menu (enough to be shown).
    for i in 0..6 {
        let t = srv
            .tickets
            .file(NewTicket {
                service_code: "pothole".into(),
                service_name: "Pothole".into(),
                ..NewTicket::default()
            })
            .await
            .unwrap();
        if i < 2 {
            srv.tickets
                .update_status(t.service_request_id, Status::Closed, Some("filled"))
                .await
                .unwrap();
        }
    }
    for _ in 0..5 {
        let mut ua = TestUa::udp(srv.sip_addr).await;
        assert_eq!(ua.call("0 101").await.code, 200);
        ua.listen(Duration::from_millis(100)).await;
        ua.bye().await;
    }
    let deadline = tokio::time::Instant::now() + WITHIN;
    while get_json(http, "/admin/reports/calls").await["total"]["calls"] != 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls not in the history"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let b = Browser::start(BrowserOptions::default()).await;
    b.goto(&format!("http://{http}/dashboard")).await;
    b.wait_for(
        "the figures",
        "return document.querySelectorAll('#calls tbody tr').length > 0",
        WITHIN,
    )
    .await;
    let data = get_json(http, "/open-data/dashboard.json").await;

    // The newest day of the call centre, cell by cell.
    let row = b
        .execute(
            "return [...document.querySelectorAll('#calls tbody tr:first-child td')].map(td => td.textContent)",
            vec![],
        )
        .await;
    let day = data["call_centre_daily"]
        .as_array()
        .and_then(|d| d.last())
        .cloned()
        .unwrap_or_else(|| panic!("{data}"));
    let n = |v: &Value| match v {
        Value::Null => "·".to_owned(),
        v => v.to_string(),
    };
    let pct_or_dot = |v: &Value| match v.as_f64() {
        Some(f) => format!("{:.1}%", f * 100.0),
        None => "·".to_owned(),
    };
    let secs = |v: &Value| match v.as_f64() {
        Some(f) => format!("{} s", f.round()),
        None => "·".to_owned(),
    };
    assert_eq!(day["calls"], 5, "{data}");
    assert_eq!(
        row,
        json!([
            day["date"].as_str().unwrap(),
            n(&day["calls"]),
            n(&day["offered"]),
            n(&day["answered"]),
            n(&day["abandoned"]),
            pct_or_dot(&day["service_level"]),
            secs(&day["asa_seconds"]),
            pct_or_dot(&day["abandonment_rate"]),
        ])
    );

    // Requests this week: potholes opened and closed as the open data has them.
    let week = data["requests_weekly"]
        .as_array()
        .and_then(|w| w.iter().rev().find(|r| r["service_code"] == "pothole"))
        .cloned()
        .unwrap_or_else(|| panic!("{data}"));
    let cells = b
        .execute(
            "const r = [...document.querySelectorAll('#weekly tbody tr')]
               .find(tr => tr.children[1].textContent === 'Pothole');
             return r ? [...r.children].map(td => td.textContent) : null;",
            vec![],
        )
        .await;
    assert_eq!(
        cells,
        json!([
            week["week_start"].as_str().unwrap(),
            "Pothole",
            n(&week["opened"]),
            n(&week["closed"]),
        ]),
        "{data}"
    );
    let shot = b.screenshot("dashboard").await;
    keep_screenshot(&shot, "dashboard.png");
    drop(b);
    srv.shutdown().await;
}
