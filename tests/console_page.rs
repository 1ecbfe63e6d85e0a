//! The console page in headless Chromium (Debian's `chromium` and `chromium-driver`), driven
//! over WebDriver with plain HTTP: log in, the state bar, a SIP caller pressing 0 rings in the
//! page with their number and earlier requests, Decline stops the desk phone ringing, Spanish,
//! and a request filed from the form is found over Open311. The call's audio stays on a SIP
//! test phone here (a desk phone operator); browser audio is tested with the WebRTC harness.
//!
//! On failure the page's screenshot is saved under `target/tmp/browser-shots/`
//! ([`common::browser`]).

mod common;

use common::browser::{Browser, BrowserOptions};
use common::*;
use ivr311::dispatch::tickets::NewTicket;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_on_a_desk_phone_works_a_call_from_the_page() {
    let srv = start_server(agents_config(&["1001"], 60, 30)).await;
    srv.tickets
        .file(NewTicket {
            service_code: "streetlight".into(),
            service_name: "Streetlight out".into(),
            phone: Some("+15550001111".into()),
            ..NewTicket::default()
        })
        .await
        .unwrap();
    let phone = TestAgent::login(srv.sip_addr, "1001").await;
    let b = Browser::start(BrowserOptions::default()).await;
    b.goto(&format!("http://{}/console", srv.http_addr)).await;

    // A wrong password is refused in the page; the right one opens the console.
    b.type_in("#login-agent", "1001").await;
    b.type_in("#login-password", "nope").await;
    b.click("#login-form button").await;
    b.text_until("#login-error", |t| t.contains("Wrong")).await;
    b.execute(
        "document.getElementById('login-password').value = ''",
        vec![],
    )
    .await;
    b.type_in("#login-password", "pw1001").await;
    b.click("#login-form button").await;
    b.text_until("#state", |t| t == "Ready").await;

    // Not ready, then Ready again, from the state bar.
    b.click("#btn-notready").await;
    b.text_until("#state", |t| t.starts_with("Not ready")).await;
    assert_eq!(agent_state(srv.http_addr, "1001").await, "paused");
    b.click("#btn-ready").await;
    b.text_until("#state", |t| t == "Ready").await;

    // A caller presses 0: the page rings with who they are and what they asked for before.
    let mut caller = caller_pressing(srv.sip_addr, "110").await;
    let inv = phone.request("INVITE", Duration::from_secs(10)).await;
    phone.reply(&inv, 180, "Ringing", None).await;
    b.text_until("#banner-number", |t| t == "+15550001111")
        .await;
    b.text_until("#c-path", |t| t == "Operator").await;
    b.text_until("#history", |t| t.contains("Streetlight out"))
        .await;
    // In Spanish.
    b.click("#lang-es").await;
    b.text_until("#btn-decline", |t| t == "Rechazar").await;
    b.click("#lang-en").await;
    // Decline: the desk phone stops ringing; the operator rests as after a missed call.
    b.click("#btn-decline").await;
    phone.request("CANCEL", Duration::from_secs(5)).await;
    b.text_until("#state", |t| t.starts_with("Missed call pause"))
        .await;
    assert!(
        b.execute("return document.getElementById('banner').hidden", vec![])
            .await
            == json!(true)
    );

    // Back to ready: offered again, answered on the phone; a request filed from the form.
    b.click("#btn-ready").await;
    let inv = phone.request("INVITE", Duration::from_secs(10)).await;
    phone.reply(&inv, 200, "OK", Some(phone.answer_sdp())).await;
    phone.request("ACK", Duration::from_secs(3)).await;
    b.text_until("#state", |t| t == "On a call").await;
    b.execute(
        "document.getElementById('t-service').value = 'pothole'",
        vec![],
    )
    .await;
    b.type_in("#t-address", "100 Main St").await;
    b.type_in("#t-zip", "10458").await;
    b.click("#ticket-form button[type=submit]").await;
    let shown = b
        .text_until("#filed-number", |t| t.len() == 9)
        .await
        .replace(' ', "");
    let (status, body) = common::http(
        srv.http_addr,
        "GET",
        &format!("/open311/v2/requests/{shown}.json"),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("100 Main St"), "{body}");

    // Hang up from the page: the caller hears BYE and the page shows wrap-up.
    b.click("#btn-hangup").await;
    caller.expect_request("BYE", Duration::from_secs(5)).await;
    b.text_until("#state", |t| t.starts_with("Wrap-up")).await;
    drop(b);
    srv.shutdown().await;
}
