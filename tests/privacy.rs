//! Integration: callers' personal data through the real server. Tickets are filed by SIP
//! calls (with a recorded description) and Open311 POSTs; then `ivr311 privacy export` and
//! `erase` run as the binary against the same database, the retention pass runs on a server
//! whose clock is set past the retention periods, and the public outputs are scanned for
//! what must never be in them.

mod common;

use common::*;
use ivr311::config::{FileConfig, ServeArgs};
use ivr311::dispatch::tickets::{Ticket, TicketQuery, TicketStore};
use ivr311::menu::schedule::WallClock;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const KEY: &str = "k1";
/// The resident whose data is asked for, as their phone sends it.
const NUMBER: &str = "+12125550100";
/// Someone else.
const OTHER: &str = "+12125550199";

fn config(recordings: &Path) -> FileConfig {
    let mut file = FileConfig::default();
    file.open311.api_keys = vec![KEY.into()];
    file.open311.post_rate_per_minute = 0;
    file.storage.recordings_dir = recordings.to_owned();
    file
}

fn temp(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ivr311-{tag}-{}", rand::random::<u64>()))
}

/// A pothole call from `from`: ZIP 94103, a spoken description, pound, hang up.
async fn call_in(srv: &ivr311::server::RunningServer, from: &str) -> String {
    let mut ua = TestUa::udp(srv.sip_addr).await;
    ua.from_user = from.into();
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("1111").await;
    ua.keys("94103").await;
    until_recording(&mut ua, srv).await;
    ua.speak(50).await;
    ua.press('#').await;
    let call_id = ua.call_id.clone();
    let store = srv.tickets.clone();
    let cid = call_id.clone();
    until("the call's ticket", Duration::from_secs(20), async || {
        let all = store.list(&TicketQuery::default()).await.ok()?;
        all.into_iter()
            .find(|t| t.call_id.as_deref() == Some(&cid) && t.recording.is_some())
    })
    .await;
    ua.bye().await;
    call_id
}

/// An Open311 POST with contact fields; returns the ticket number.
async fn post(srv: &ivr311::server::RunningServer, phone: &str, email: &str) -> String {
    let mut f = form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("api_key", KEY),
        ("service_code", "pothole"),
        ("attribute[zipcode]", "94103"),
        ("phone", phone),
        ("email", email),
        ("first_name", "Rosalind"),
        ("last_name", "Quintero"),
        ("description", "deep hole by the bus stop"),
    ] {
        f.append_pair(k, v);
    }
    let body = f.finish();
    let (status, text) = http(
        srv.http_addr,
        "POST",
        "/open311/v2/requests.json",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v[0]["service_request_id"].as_str().unwrap().to_owned()
}

/// Waits until the call history holds `n` calls (written after each call ends).
async fn until_history(srv: &ivr311::server::RunningServer, n: usize) {
    let path = report_path();
    until(
        "the calls in history",
        Duration::from_secs(20),
        async || {
            let (status, body) = http(srv.http_addr, "GET", &path, &[], b"").await;
            let v: Value = serde_json::from_str(&body).ok()?;
            (status == 200 && v["total"]["calls"].as_u64() == Some(n as u64)).then_some(())
        },
    )
    .await;
}

fn report_path() -> String {
    let today = time::OffsetDateTime::now_utc().date();
    format!(
        "/admin/reports/calls?from={}&to={}&interval=day",
        today.previous_day().unwrap(),
        today.next_day().unwrap().next_day().unwrap()
    )
}

/// What the public and the admins' reports count: the Open311 list and the calls report.
async fn counts(srv: &ivr311::server::RunningServer) -> (usize, Value) {
    let (_, list) = http(srv.http_addr, "GET", "/open311/v2/requests.json", &[], b"").await;
    let list: Value = serde_json::from_str(&list).unwrap();
    let (_, report) = http(srv.http_addr, "GET", &report_path(), &[], b"").await;
    let report: Value = serde_json::from_str(&report).unwrap();
    (list.as_array().unwrap().len(), report["total"].clone())
}

/// `ivr311 privacy <what> --phone <phone>` on the test's database; (stdout as JSON, stderr).
fn privacy_cli(what: &str, phone: &str, args: &ServeArgs, config: &Path) -> (Value, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivr311"));
    cmd.args(["privacy", what, "--phone", phone]);
    if what == "erase" {
        cmd.args(["--by", "records-clerk"]);
    }
    let out = cmd
        .arg("--db")
        .arg(&args.db)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("IVR311_DB")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "privacy {what}: {stderr}");
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (v, stderr)
}

fn write_config(recordings: &Path) -> PathBuf {
    let path = temp("privacy-config").with_extension("yaml");
    std::fs::write(
        &path,
        format!(
            "storage:\n  recordings_dir: {:?}\n",
            recordings.display().to_string()
        ),
    )
    .unwrap();
    path
}

fn len(v: &Value, key: &str) -> usize {
    v[key].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn export_finds_a_number_everywhere_and_erase_removes_it_keeping_counts() {
    let recordings = temp("privacy-rec");
    let args = serve_args();
    let srv = start_server_with(args.clone(), config(&recordings)).await;
    let call_id = call_in(&srv, NUMBER).await;
    call_in(&srv, OTHER).await;
    // The same resident through an app, in the national form, and someone else.
    let web = post(&srv, "(212) 555-0100", "resident@example.org").await;
    let theirs = post(&srv, OTHER, "other@example.org").await;
    until_history(&srv, 2).await;
    let before = counts(&srv).await;
    assert_eq!(before.0, 4);
    srv.shutdown().await;
    let cfg = write_config(&recordings);

    let (found, _) = privacy_cli("export", "212-555-0100", &args, &cfg);
    assert_eq!(found["phone"], NUMBER);
    assert_eq!(len(&found, "tickets"), 2, "{found:#}");
    let ids: Vec<&str> = (found["tickets"].as_array().unwrap().iter())
        .map(|t| t["call_id"].as_str().unwrap_or(""))
        .collect();
    assert!(ids.contains(&call_id.as_str()), "{ids:?}");
    assert!(found.to_string().contains(&web.to_string()));
    assert!(!found.to_string().contains(&theirs) && !found.to_string().contains(OTHER));
    assert_eq!(len(&found, "call_history"), 1, "{found:#}");
    assert_eq!(found["call_history"][0]["call_id"], call_id.as_str());
    let recs: Vec<PathBuf> = (found["recordings"].as_array().unwrap().iter())
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    assert_eq!(recs.len(), 1, "{found:#}");
    assert!(recs[0].starts_with(&recordings) && recs[0].exists());

    let (erased, stderr) = privacy_cli("erase", "+1 212 555 0100", &args, &cfg);
    assert_eq!(erased["erased"]["tickets"], 2, "{erased}");
    assert_eq!(erased["erased"]["call_history"], 1, "{erased}");
    assert_eq!(erased["erased"]["recordings"], 1, "{erased}");
    let audit = (stderr.lines())
        .find(|l| l.contains("ivr311::audit") && l.contains("privacy erasure"))
        .unwrap_or_else(|| panic!("no audit line: {stderr}"));
    assert!(
        audit.contains("records-clerk") && audit.contains("tickets=2"),
        "{audit}"
    );
    assert!(
        !stderr.contains("555-0100") && !stderr.contains("2125550100"),
        "{stderr}"
    );
    assert!(!recs[0].exists(), "the recording is deleted");

    let (after, _) = privacy_cli("export", NUMBER, &args, &cfg);
    for key in [
        "tickets",
        "call_history",
        "callbacks",
        "outbox",
        "recordings",
    ] {
        assert_eq!(len(&after, key), 0, "{key}: {after:#}");
    }
    // Someone else's data is theirs still.
    let (other, _) = privacy_cli("export", OTHER, &args, &cfg);
    assert_eq!(len(&other, "tickets"), 2);
    assert_eq!(len(&other, "recordings"), 1);

    // Reports and the public list count the same.
    let srv = start_server_with(args.clone(), config(&recordings)).await;
    assert_eq!(counts(&srv).await, before);
    let store: &TicketStore = &srv.tickets;
    let web_ticket: Ticket = store.get(web.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(web_ticket.phone.as_deref(), Some("erased"));
    assert_eq!(web_ticket.email, None);
    assert_eq!(web_ticket.first_name, None);
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(&recordings);
    let _ = std::fs::remove_file(cfg);
}

#[tokio::test]
async fn retention_runs_on_the_servers_clock_and_keeps_the_tickets() {
    let recordings = temp("retention-rec");
    let args = serve_args();
    let srv = start_server_with(args.clone(), config(&recordings)).await;
    let call_id = call_in(&srv, NUMBER).await;
    let web = post(&srv, NUMBER, "resident@example.org").await;
    until_history(&srv, 1).await;
    let phone_ticket = until("the phone ticket", Duration::from_secs(5), async || {
        let all = srv.tickets.list(&TicketQuery::default()).await.ok()?;
        all.into_iter()
            .find(|t| t.call_id.as_deref() == Some(call_id.as_str()))
    })
    .await;
    let recording = recordings.join(phone_ticket.recording.clone().unwrap());
    assert!(recording.exists());
    srv.shutdown().await;

    // 100 days on: the recording has gone, the numbers stay.
    let day = jiff::SignedDuration::from_hours(24);
    let later = |days: i32| WallClock::starting_at(jiff::Timestamp::now() + day * days);
    let srv = start_server_at(args.clone(), config(&recordings), later(100)).await;
    let id = phone_ticket.service_request_id;
    let store = srv.tickets.clone();
    until(
        "the recording deleted",
        Duration::from_secs(10),
        async || {
            let t = store.get(id).await.ok()??;
            t.recording.is_none().then_some(())
        },
    )
    .await;
    assert!(!recording.exists());
    let t = store.get(id).await.unwrap().unwrap();
    assert_eq!(t.phone.as_deref(), Some(NUMBER));
    srv.shutdown().await;

    // 401 days on: the numbers have gone too, the tickets stay.
    let srv = start_server_at(args.clone(), config(&recordings), later(401)).await;
    let store = srv.tickets.clone();
    for id in [id, web.parse().unwrap()] {
        until("the number removed", Duration::from_secs(10), async || {
            let t = store.get(id).await.ok()??;
            (t.phone.as_deref() == Some("erased")).then_some(())
        })
        .await;
    }
    let (_, list) = http(srv.http_addr, "GET", "/open311/v2/requests.json", &[], b"").await;
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "the tickets stay");
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(&recordings);
}

/// Nothing public names a caller: their number, email, name or recording, whatever was filed.
#[tokio::test]
async fn public_outputs_never_show_personal_fields_or_recordings() {
    let recordings = temp("public-rec");
    let mut file = config(&recordings);
    file.open311.public_url = Some("https://311.example.gov".into());
    let srv = start_server(file).await;
    call_in(&srv, NUMBER).await;
    let web = post(&srv, "212-555-0199", "resident@example.org").await;
    until_history(&srv, 1).await;
    let recording = (srv.tickets.list(&TicketQuery::default()).await.unwrap())
        .into_iter()
        .find_map(|t| t.recording)
        .unwrap();
    let mut paths = vec![
        "/open311/v2/requests.json".to_owned(),
        "/open311/v2/requests.xml".to_owned(),
        format!("/open311/v2/requests/{web}.json"),
        format!("/open311/v2/requests/{web}.xml"),
        "/open311/v2/services.json".to_owned(),
        "/dashboard".to_owned(),
    ];
    for name in [
        "requests-weekly",
        "time-to-close",
        "open-by-age",
        "call-centre-daily",
    ] {
        for ext in ["csv", "json"] {
            paths.push(format!("/open-data/{name}.{ext}"));
        }
    }
    paths.push("/open-data/dashboard.json".to_owned());
    let forbidden = [
        "5550100",
        "555-0199",
        "5550199",
        "resident@example.org",
        "Rosalind",
        "Quintero",
        recording.as_str(),
        ".wav",
        "recording",
    ];
    for path in &paths {
        let (status, body) = http(srv.http_addr, "GET", path, &[], b"").await;
        assert_eq!(status, 200, "{path}: {body}");
        for f in forbidden {
            assert!(!body.contains(f), "{path} shows {f:?}: {body}");
        }
    }
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(&recordings);
}
