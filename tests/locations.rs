//! Integration: where the problem is, from a phone. Through SIP and the shipped menu a caller
//! reports a streetlight (a service with `house_number: true`), keys the ZIP and then the
//! house number (or pound to skip it); the ticket shows both in Open311, and a second
//! ivr311, the city's CRM, receives the house number and ZIP as `address_string`.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::tickets::{Channel, Ticket};
use ivr311::forward::Open311Forward;
use ivr311::server::RunningServer;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

const CRM_KEY: &str = "city-crm-key";

/// The CRM: a plain ivr311 taking POSTs with [`CRM_KEY`].
async fn start_crm() -> RunningServer {
    let mut file = FileConfig::default();
    file.open311.api_keys = vec![CRM_KEY.into()];
    start_server(file).await
}

/// The city's server, forwarding to the CRM at `crm`.
async fn start_city(crm: SocketAddr) -> RunningServer {
    let mut file = FileConfig::default();
    file.forward.open311 = Some(Open311Forward {
        url: format!("http://{crm}/open311/v2"),
        api_key: CRM_KEY.into(),
        jurisdiction_id: None,
        service_map: Default::default(),
    });
    file.forward.retry_base_seconds = 1;
    file.forward.retry_max_seconds = 1;
    file.forward.timeout_seconds = 3;
    start_server(file).await
}

/// A streetlight call: English, not an emergency, streets, streetlight, ZIP 94103, then
/// `house` at the house-number prompt (after hearing it), pound at the street prompt.
async fn report_streetlight(city: &RunningServer, house: &str) -> Ticket {
    let mut ua = TestUa::udp(city.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("1112").await;
    ua.keys("94103").await;
    let heard = ua
        .listen_for("en", "enter_house_number", Duration::from_secs(15))
        .await;
    assert!(
        PromptEar::new("en", &["enter_house_number"], ua.codec).frames_heard(&heard) >= 10,
        "the house number is asked for"
    );
    if house == "#" {
        // As a caller does: to the prompt's end ("To skip, press pound.").
        ua.listen(Duration::from_secs(3)).await;
    }
    ua.keys(house).await;
    let heard = ua
        .listen_for("en", "record_street", Duration::from_secs(15))
        .await;
    assert!(
        PromptEar::new("en", &["record_street"], ua.codec).frames_heard(&heard) >= 10,
        "the recording prompt asks for the street"
    );
    ua.press('#').await;
    let call_id = ua.call_id.clone();
    let t = until("the ticket is filed", Duration::from_secs(15), async || {
        (city.tickets.list(&Default::default()).await.ok()?)
            .into_iter()
            .find(|t| t.call_id.as_deref() == Some(call_id.as_str()))
    })
    .await;
    ua.bye().await;
    t
}

async fn open311(city: &RunningServer, id: u64) -> Value {
    let (status, text) = http(
        city.http_addr,
        "GET",
        &format!("/open311/v2/requests/{id}.json"),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// The CRM's copy of the city's ticket, once forwarded.
async fn at_the_crm(city: &RunningServer, crm: &RunningServer, id: u64) -> Ticket {
    let external = until(
        "the ticket reaches the CRM",
        Duration::from_secs(15),
        async || city.tickets.get(id).await.ok()??.external_id,
    )
    .await;
    crm.tickets
        .get(external.parse().unwrap())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_keyed_house_number_reaches_open311_and_the_crm_and_pound_skips_it() {
    let crm = start_crm().await;
    let city = start_city(crm.http_addr).await;

    let t = report_streetlight(&city, "421#").await;
    assert_eq!(t.channel, Channel::Phone);
    assert_eq!(t.service_code, "streetlight");
    assert_eq!(t.zipcode.as_deref(), Some("94103"));
    assert_eq!(t.house_number.as_deref(), Some("421"));
    let v = open311(&city, t.service_request_id).await;
    assert_eq!(v[0]["address"], "421, ZIP 94103", "{v}");
    assert_eq!(v[0]["zipcode"], "94103");
    let theirs = at_the_crm(&city, &crm, t.service_request_id).await;
    assert_eq!(theirs.address.as_deref(), Some("421, ZIP 94103"));
    assert_eq!(theirs.zipcode.as_deref(), Some("94103"));

    // Pound alone: no house number, the ZIP as before.
    let t = report_streetlight(&city, "#").await;
    assert_eq!(t.house_number, None);
    assert_eq!(t.zipcode.as_deref(), Some("94103"));
    let v = open311(&city, t.service_request_id).await;
    assert!(v[0]["address"].is_null(), "{v}");
    let theirs = at_the_crm(&city, &crm, t.service_request_id).await;
    assert_eq!(theirs.address, None);
    assert_eq!(theirs.zipcode.as_deref(), Some("94103"));

    city.shutdown().await;
    crm.shutdown().await;
}
