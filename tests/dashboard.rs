//! The transparency page and open data: served without a login, aggregates only, counts
//! from 1 to 4 suppressed, and no caller's number anywhere.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::tickets::{Channel, NewTicket, Status};
use serde_json::Value;
use std::time::Duration;

const NUMBER: &str = "5550001111";

async fn file(srv: &ivr311::server::RunningServer, code: &str, name: &str) -> u64 {
    srv.tickets
        .file(NewTicket {
            service_code: code.into(),
            service_name: name.into(),
            channel: Channel::Phone,
            phone: Some(format!("+1{NUMBER}")),
            first_name: Some("Ada".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .service_request_id
}

#[tokio::test]
async fn open_data_suppresses_small_counts_and_shows_no_caller() {
    // An admin token: the public pages must not need it.
    let mut config = FileConfig::default();
    config.admin.token = Some("t0ken-for-admins".into());
    let srv = start_server(config).await;
    // Six pothole requests (two closed) and two graffiti requests.
    let mut potholes = Vec::new();
    for _ in 0..6 {
        potholes.push(file(&srv, "pothole", "Pothole").await);
    }
    for _ in 0..2 {
        file(&srv, "graffiti", "Graffiti").await;
    }
    for id in &potholes[..2] {
        srv.tickets
            .update_status(*id, Status::Closed, Some("filled"))
            .await
            .unwrap();
    }
    // Five calls from the same number, each hung up in the menu.
    for _ in 0..5 {
        let mut ua = TestUa::udp(srv.sip_addr).await;
        assert_eq!(ua.call("0 101").await.code, 200);
        ua.listen(Duration::from_millis(100)).await;
        ua.bye().await;
    }
    // The history is written off the calls' path: wait until all five are counted.
    let auth = [("Authorization", "Bearer t0ken-for-admins")];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http(srv.http_addr, "GET", "/admin/reports/calls", &auth, b"").await;
        let r: Value = serde_json::from_str(&body).unwrap();
        if r["total"]["calls"] == 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (status, body) = http(srv.http_addr, "GET", "/open-data/dashboard.json", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    let d: Value = serde_json::from_str(&body).unwrap();
    let weekly = d["requests_weekly"].as_array().unwrap();
    let pothole = weekly
        .iter()
        .find(|r| r["service_code"] == "pothole")
        .unwrap_or_else(|| panic!("{d}"));
    let graffiti = weekly
        .iter()
        .find(|r| r["service_code"] == "graffiti")
        .unwrap();
    assert_eq!(pothole["opened"], 6, "{pothole}");
    assert_eq!(
        pothole["closed"],
        Value::Null,
        "two closed: suppressed: {pothole}"
    );
    assert_eq!(
        graffiti["opened"],
        Value::Null,
        "two opened: suppressed: {graffiti}"
    );
    let close = d["time_to_close"].as_array().unwrap();
    let p = close
        .iter()
        .find(|r| r["service_code"] == "pothole")
        .unwrap();
    assert_eq!(p["closed"], Value::Null, "{p}");
    assert_eq!(
        p["median_days"],
        Value::Null,
        "a median over two requests: {p}"
    );
    let age = d["open_by_age"].as_array().unwrap();
    let p = age.iter().find(|r| r["service_code"] == "pothole").unwrap();
    assert_eq!(p["days_0_7"], Value::Null, "four open: {p}");
    let g = age
        .iter()
        .find(|r| r["service_code"] == "graffiti")
        .unwrap();
    assert_eq!(g["days_8_30"], 0, "zero is shown: {g}");
    let days = d["call_centre_daily"].as_array().unwrap();
    let today = days.last().unwrap();
    assert_eq!(today["calls"], 5, "{today}");
    assert_eq!(today["offered"], 0, "{today}");
    assert_eq!(
        today["service_level"],
        Value::Null,
        "no calls offered: {today}"
    );

    // The CSV files: the same cells, suppressed ones empty.
    let (status, csv) = http(
        srv.http_addr,
        "GET",
        "/open-data/requests-weekly.csv",
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        csv.starts_with("week_start,service_code,service_name,opened,closed\n"),
        "{csv}"
    );
    assert!(
        csv.lines().any(|l| l.ends_with(",pothole,Pothole,6,")),
        "{csv}"
    );
    assert!(
        csv.lines().any(|l| l.ends_with(",graffiti,Graffiti,,0")),
        "{csv}"
    );

    // No caller's number, name or call id in anything the public can fetch.
    let mut everything = String::new();
    for path in [
        "/dashboard",
        "/dashboard/app.js",
        "/dashboard/style.css",
        "/open-data/dashboard.json",
        "/open-data/requests-weekly.csv",
        "/open-data/requests-weekly.json",
        "/open-data/time-to-close.csv",
        "/open-data/time-to-close.json",
        "/open-data/open-by-age.csv",
        "/open-data/open-by-age.json",
        "/open-data/call-centre-daily.csv",
        "/open-data/call-centre-daily.json",
    ] {
        let (status, body) = http(srv.http_addr, "GET", path, &[], b"").await;
        assert_eq!(status, 200, "{path}: {body}");
        everything.push_str(&body);
    }
    assert!(!everything.contains(NUMBER), "a caller's number is public");
    assert!(!everything.contains("Ada"), "a caller's name is public");
    assert!(!everything.contains("@127.0.0.1"), "a Call-ID is public");
    // The page is the project's own: nothing loaded from elsewhere.
    let (_, page) = http(srv.http_addr, "GET", "/dashboard", &[], b"").await;
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
    let (status, _) = http(srv.http_addr, "GET", "/open-data/calls.csv", &[], b"").await;
    assert_eq!(status, 404);
    srv.shutdown().await;
}
