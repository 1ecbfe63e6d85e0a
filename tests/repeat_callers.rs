//! Integration: callers who already filed. With `repeat_callers: true` in the shipped menu, a
//! caller whose number (asserted by a trusted trunk, not withheld) has an open request hears
//! it after screening and can hear its status; with `duplicates: {days: 7}`, a caller filing
//! a service at a ZIP code where it is already reported can add themselves to that request
//! instead of opening a new one.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::tickets::{Channel, NewTicket};
use ivr311::media::g711::Codec;
use ivr311::menu::schedule::WallClock;
use std::time::Duration;

const CALLER: &str = "+15550001111";

/// The shipped menu with `repeat_callers` and `duplicates` switched on, next to nothing else.
fn menu_with_options() -> std::path::PathBuf {
    let shipped = std::fs::read_to_string(repo().join("menus/311.yaml")).unwrap();
    let path = std::env::temp_dir().join(format!("ivr311-repeat-{}.yaml", rand::random::<u64>()));
    std::fs::write(
        &path,
        format!("{shipped}\nrepeat_callers: true\nduplicates: {{days: 7}}\n"),
    )
    .unwrap();
    path
}

/// The server on the menu above, trusting this machine's trunk, its clock `days` ahead.
async fn server(days: i64) -> ivr311::server::RunningServer {
    let mut args = serve_args();
    args.menu = menu_with_options();
    let mut file = FileConfig::default();
    file.trunks.allow = vec!["127.0.0.1".parse().unwrap()];
    let at = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(24 * days))
        .unwrap();
    start_server_at(args, file, WallClock::starting_at(at)).await
}

async fn file_ticket(
    srv: &ivr311::server::RunningServer,
    phone: &str,
    service: &str,
    zip: &str,
) -> u64 {
    srv.tickets
        .file(NewTicket {
            service_code: service.into(),
            service_name: service.into(),
            zipcode: Some(zip.into()),
            phone: Some(phone.into()),
            channel: Channel::Phone,
            ..NewTicket::default()
        })
        .await
        .unwrap()
        .service_request_id
}

fn digits(id: u64) -> Vec<String> {
    id.to_string()
        .chars()
        .map(|c| format!("digit_{c}"))
        .collect()
}

/// Call with `extra` headers, choose English, and go past the screening with 1.
async fn past_screening(ua: &mut TestUa, extra: &str) {
    let (_, r) = ua.call_with("0 101", extra).await;
    assert_eq!(r.code, 200);
    ua.until_audio().await;
    ua.press('1').await;
    ua.listen_for("en", "screening", Duration::from_secs(15))
        .await;
    ua.press('1').await;
}

fn asserted() -> String {
    format!("P-Asserted-Identity: <sip:{CALLER}@127.0.0.1>\r\n")
}

#[tokio::test]
async fn a_caller_with_an_open_request_hears_its_number_and_age_and_can_hear_its_status() {
    // The request was filed three days before the server's clock reads.
    let srv = server(3).await;
    let id = file_ticket(&srv, CALLER, "pothole", "94103").await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    past_screening(&mut ua, &asserted()).await;
    let heard = ua
        .listen_for("en", "open_request_status", Duration::from_secs(20))
        .await;
    // "You have an open service request, number <digits>, filed three days ago. To hear its
    // status, press 1." (`num_3` sounds as `digit_3` does: the digits are checked apart.)
    let ear = PromptEar::new(
        "en",
        &[
            "open_request",
            "filed_days_ago_pre",
            "num_3",
            "filed_days_ago_post",
            "open_request_status",
        ],
        Codec::Pcmu,
    );
    let got = prompts_heard(&ear, &heard);
    assert_eq!(
        got.first().map(String::as_str),
        Some("open_request"),
        "{got:?}"
    );
    assert_eq!(
        got[got.len().saturating_sub(4)..],
        [
            "filed_days_ago_pre",
            "num_3",
            "filed_days_ago_post",
            "open_request_status"
        ],
        "{got:?}"
    );
    let mut number: Vec<String> = digits(id);
    number.sort();
    number.dedup();
    let refs: Vec<&str> = number.iter().map(String::as_str).collect();
    let mut want = digits(id);
    want.dedup();
    let ear = PromptEar::new("en", &refs, Codec::Pcmu);
    let read = prompts_heard(&ear, &heard);
    assert!(read.starts_with(&want), "{read:?} reads {want:?}");
    // 1: its status.
    ua.press('1').await;
    let status = ua
        .listen_for("en", "ticket_status_open", Duration::from_secs(10))
        .await;
    let ear = PromptEar::new("en", &["ticket_status_open"], Codec::Pcmu);
    assert!(ear.frames_heard(&status) >= 10);
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_withheld_or_unvouched_number_hears_nothing_of_its_requests() {
    let srv = server(0).await;
    file_ticket(&srv, CALLER, "pothole", "94103").await;
    let ear = PromptEar::new("en", &["open_request", "main_menu"], Codec::Pcmu);
    // Privacy: id (RFC 3323) withholds the number; a number no trusted trunk asserts is
    // only claimed.
    for extra in [format!("{}Privacy: id\r\n", asserted()), String::new()] {
        let mut ua = TestUa::udp(srv.sip_addr).await;
        past_screening(&mut ua, &extra).await;
        let heard = ua
            .listen_for("en", "main_menu", Duration::from_secs(15))
            .await;
        assert_eq!(prompts_heard(&ear, &heard), vec!["main_menu"], "{extra:?}");
        ua.bye().await;
    }
    // The same caller, asserted and not withheld, does hear it (the request is there).
    let mut ua = TestUa::udp(srv.sip_addr).await;
    past_screening(&mut ua, &asserted()).await;
    let heard = ua
        .listen_for("en", "open_request", Duration::from_secs(15))
        .await;
    assert_eq!(
        prompts_heard(&ear, &heard).first().map(String::as_str),
        Some("open_request")
    );
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_report_adds_to_the_open_request_instead_of_opening_another() {
    let srv = server(0).await;
    // Someone else reported a pothole at 94103.
    let id = file_ticket(&srv, "+15550002222", "pothole", "94103").await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    past_screening(&mut ua, &asserted()).await;
    ua.listen_for("en", "main_menu", Duration::from_secs(15))
        .await;
    // Streets, pothole, ZIP 94103.
    ua.keys("11").await;
    ua.listen_for("en", "enter_zip", Duration::from_secs(10))
        .await;
    ua.keys("94103").await;
    let heard = ua
        .listen_for("en", "duplicate_choice", Duration::from_secs(20))
        .await;
    let mut names = vec!["already_reported".to_owned(), "duplicate_choice".to_owned()];
    names.extend(digits(id));
    names.sort();
    names.dedup();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let ear = PromptEar::new("en", &refs, Codec::Pcmu);
    let got = prompts_heard(&ear, &heard);
    // After the read-back of the ZIP code: "already reported ... number <digits>", the choice.
    let at = got
        .iter()
        .position(|p| p == "already_reported")
        .expect("already reported");
    let mut want = vec!["already_reported".to_owned()];
    want.extend(digits(id));
    want.push("duplicate_choice".into());
    want.dedup();
    assert_eq!(got[at..], want, "{got:?}");
    // 1: add me to it.
    ua.press('1').await;
    let heard = ua
        .listen_for("en", "added_to_request", Duration::from_secs(10))
        .await;
    let ear = PromptEar::new("en", &["added_to_request"], Codec::Pcmu);
    assert!(ear.frames_heard(&heard) >= 10);
    let counted = until("the duplicate counted", Duration::from_secs(10), || async {
        let (code, body) = common::http(
            srv.http_addr,
            "GET",
            &format!("/open311/v2/requests/{id}.json"),
            &[],
            b"",
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (v[0]["duplicates"] == 1).then_some(v)
    })
    .await;
    assert_eq!(counted[0]["service_request_id"], id.to_string());
    let all = srv.tickets.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 1, "no new request was opened");
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn pressing_2_files_a_new_request_anyway() {
    let srv = server(0).await;
    let id = file_ticket(&srv, "+15550002222", "pothole", "94103").await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    past_screening(&mut ua, "").await;
    ua.listen_for("en", "main_menu", Duration::from_secs(15))
        .await;
    ua.keys("11").await;
    ua.listen_for("en", "enter_zip", Duration::from_secs(10))
        .await;
    ua.keys("94103").await;
    let heard = ua
        .listen_for("en", "duplicate_choice", Duration::from_secs(20))
        .await;
    let ear = PromptEar::new("en", &["duplicate_choice"], Codec::Pcmu);
    assert!(
        ear.frames_heard(&heard) >= 10,
        "offered to join the open request"
    );
    ua.press('2').await;
    ua.skip_description("en").await;
    let all = until("a second request", Duration::from_secs(15), || async {
        let all = srv.tickets.list(&Default::default()).await.unwrap();
        (all.len() == 2).then_some(all)
    })
    .await;
    assert!(all
        .iter()
        .any(|t| t.service_request_id != id && t.service_code == "pothole"));
    let first = srv.tickets.get(id).await.unwrap().unwrap();
    assert_eq!(first.duplicates, 0);
    ua.bye().await;
    srv.shutdown().await;
}
