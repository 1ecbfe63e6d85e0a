//! Integration: tickets leave the box. A second ivr311, started by the test, is the city's
//! CRM (it speaks Open311 GeoReport v2); the city's server forwards every ticket to it
//! through the outbox, over real HTTP, and takes its status back. Webhooks go to a small
//! hyper server in the test, which checks their signatures.

mod common;

use common::*;
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use ivr311::config::FileConfig;
use ivr311::forward::{Open311Forward, WebhookConfig};
use ivr311::server::RunningServer;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CRM_KEY: &str = "city-crm-key";
const APP_KEY: &str = "app-key";
const ADMIN: &str = "admin-token";

/// The CRM: a plain ivr311 taking POSTs with [`CRM_KEY`], on `http` and its own database.
async fn start_crm(http: SocketAddr, db: PathBuf) -> RunningServer {
    let mut args = serve_args();
    args.http = http;
    args.db = db;
    let mut file = FileConfig::default();
    file.open311.api_keys = vec![CRM_KEY.into()];
    file.admin.token = Some(ADMIN.into());
    start_server_with(args, file).await
}

/// A loopback port nobody listens on now (bound, then let go).
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn temp_db(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "ivr311-forward-{name}-{}.db",
        rand::random::<u64>()
    ))
}

/// The city's config: forwarding to the CRM at `crm`, fast retries, polling every second.
fn city_config(crm: SocketAddr, service_map: &[(&str, &str)]) -> FileConfig {
    let mut file = FileConfig::default();
    file.open311.api_keys = vec![APP_KEY.into()];
    file.admin.token = Some(ADMIN.into());
    file.forward.open311 = Some(Open311Forward {
        url: format!("http://{crm}/open311/v2"),
        api_key: CRM_KEY.into(),
        jurisdiction_id: None,
        service_map: service_map
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    });
    file.forward.retry_base_seconds = 1;
    file.forward.retry_max_seconds = 1;
    file.forward.timeout_seconds = 3;
    file.forward.poll_seconds = 1;
    file
}

fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {ADMIN}"))
}

async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (k, v) = bearer();
    http(addr, "GET", path, &[(k, v.as_str())], b"").await
}

async fn admin_post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let (k, v) = bearer();
    http(
        addr,
        "POST",
        path,
        &[(k, v.as_str()), ("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
}

/// Files a pothole through the city's Open311 API; its number.
async fn file_by_api(city: SocketAddr, description: &str) -> u64 {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("api_key", APP_KEY)
        .append_pair("service_code", "pothole")
        .append_pair("address_string", "12 Elm St")
        .append_pair("description", description)
        .append_pair("email", "resident@example.org")
        .finish();
    let (status, text) = http(
        city,
        "POST",
        "/open311/v2/requests.json",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v[0]["service_request_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The city's ticket as `/admin` shows it.
async fn city_ticket(city: SocketAddr, id: u64) -> Value {
    let (status, text) = admin_get(city, &format!("/admin/requests/{id}")).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Waits until the city's ticket `id` carries the CRM's number; returns it.
async fn until_forwarded(city: SocketAddr, id: u64, within: Duration) -> String {
    until("the ticket reaches the CRM", within, async || {
        city_ticket(city, id).await["external_id"]
            .as_str()
            .map(str::to_owned)
    })
    .await
}

/// The gauges of `/metrics` (with the admin token), by name.
async fn gauges(addr: SocketAddr) -> std::collections::HashMap<String, f64> {
    let (status, body) = admin_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

async fn outbox(city: SocketAddr, query: &str) -> Vec<Value> {
    let (status, text) = admin_get(city, &format!("/admin/outbox{query}")).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// How many of the CRM's tickets have `description`.
async fn crm_count(crm: &RunningServer, description: &str) -> usize {
    crm.tickets
        .list(&Default::default())
        .await
        .unwrap()
        .iter()
        .filter(|t| t.description.as_deref() == Some(description))
        .count()
}

#[tokio::test]
async fn tickets_from_the_api_and_the_phone_reach_the_crm_once_with_its_number_kept() {
    let crm = start_crm("127.0.0.1:0".parse().unwrap(), temp_db("crm")).await;
    let city = start_server(city_config(crm.http_addr, &[])).await;

    let id = file_by_api(city.http_addr, "api pothole").await;
    let external = until_forwarded(city.http_addr, id, Duration::from_secs(10)).await;
    let theirs = crm.tickets.get(external.parse().unwrap()).await.unwrap();
    let theirs = theirs.expect("the CRM has the request under the number we stored");
    assert_eq!(theirs.description.as_deref(), Some("api pothole"));
    assert_eq!(theirs.service_code, "pothole");
    assert_eq!(theirs.address.as_deref(), Some("12 Elm St"));
    assert_eq!(theirs.email.as_deref(), Some("resident@example.org"));

    // Shown in Open311 beside ours.
    let (status, text) = http(
        city.http_addr,
        "GET",
        &format!("/open311/v2/requests/{id}.json"),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v[0]["external_id"].as_str(), Some(external.as_str()));

    // By phone: English, not an emergency, streets, pothole, ZIP 94103, a recording.
    let mut ua = TestUa::udp(city.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("1111").await;
    ua.keys("94103").await;
    until_recording(&mut ua, &city).await;
    ua.speak(50).await;
    ua.press('#').await;
    let phone_ticket = until(
        "the phone ticket is filed",
        Duration::from_secs(15),
        async || {
            city.tickets
                .list(&Default::default())
                .await
                .unwrap()
                .into_iter()
                .find(|t| t.channel == ivr311::dispatch::tickets::Channel::Phone)
        },
    )
    .await;
    let external = until_forwarded(
        city.http_addr,
        phone_ticket.service_request_id,
        Duration::from_secs(10),
    )
    .await;
    let theirs = crm
        .tickets
        .get(external.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(theirs.zipcode.as_deref(), Some("94103"));
    assert_eq!(theirs.phone.as_deref(), Some("+15550001111"));
    assert_eq!(theirs.recording, None, "the caller's voice stays here");
    let _ = ua.bye().await;

    // Exactly two requests reached the CRM, and the outbox is empty.
    assert_eq!(
        crm.tickets.list(&Default::default()).await.unwrap().len(),
        2
    );
    until("the outbox is empty", Duration::from_secs(5), async || {
        (gauges(city.http_addr).await["ivr311_outbox_depth"] == 0.0).then_some(())
    })
    .await;
    let done = outbox(city.http_addr, "?state=done").await;
    assert_eq!(done.len(), 2, "{done:?}");
    city.shutdown().await;
    crm.shutdown().await;
}

#[tokio::test]
async fn the_crm_down_then_back_on_its_port_gets_every_ticket_exactly_once() {
    let crm_addr = free_port();
    let crm_db = temp_db("crm-restart");
    let crm = start_crm(crm_addr, crm_db.clone()).await;
    let mut cfg = city_config(crm_addr, &[]);
    cfg.forward.stuck_after_seconds = 1;
    let city = start_server(cfg).await;
    let first = file_by_api(city.http_addr, "before the outage").await;
    until_forwarded(city.http_addr, first, Duration::from_secs(10)).await;

    crm.shutdown().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        // The caller's number comes back at once whatever the CRM does.
        ids.push(file_by_api(city.http_addr, &format!("during the outage {i}")).await);
    }
    // Queued, retried, and readiness says the outbox is stuck.
    until(
        "the outbox is reported stuck",
        Duration::from_secs(10),
        async || {
            let (status, body) = http(city.http_addr, "GET", "/health/ready", &[], b"").await;
            (status == 503 && body.contains("outbox stuck")).then_some(())
        },
    )
    .await;
    let m = gauges(city.http_addr).await;
    assert_eq!(m["ivr311_outbox_depth"], 3.0, "{m:?}");
    assert!(m["ivr311_outbox_oldest_age_seconds"] >= 1.0, "{m:?}");
    let pending = outbox(city.http_addr, "?state=pending").await;
    assert!(
        pending
            .iter()
            .any(|r| r["attempts"].as_u64().unwrap_or(0) >= 2
                && r["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("connect"))),
        "retried, saying why: {pending:?}"
    );

    let crm = start_crm(crm_addr, crm_db).await;
    for &id in &ids {
        until_forwarded(city.http_addr, id, Duration::from_secs(15)).await;
    }
    assert_eq!(crm_count(&crm, "before the outage").await, 1);
    for i in 0..3 {
        assert_eq!(crm_count(&crm, &format!("during the outage {i}")).await, 1);
    }
    assert_eq!(
        crm.tickets.list(&Default::default()).await.unwrap().len(),
        4
    );
    until("ready again", Duration::from_secs(10), async || {
        let (status, _) = http(city.http_addr, "GET", "/health/ready", &[], b"").await;
        (status == 200).then_some(())
    })
    .await;
    city.shutdown().await;
    crm.shutdown().await;
}

#[tokio::test]
async fn a_mapping_the_crm_refuses_is_dead_lettered_and_sent_after_the_fix() {
    let crm = start_crm("127.0.0.1:0".parse().unwrap(), temp_db("crm-map")).await;
    let mut args = serve_args();
    let db = args.db.clone();
    let city = start_server_with(
        args.clone(),
        city_config(crm.http_addr, &[("pothole", "no_such_service")]),
    )
    .await;
    let id = file_by_api(city.http_addr, "mapped wrong").await;
    let dead = until(
        "the request is dead-lettered",
        Duration::from_secs(10),
        async || {
            outbox(city.http_addr, "?state=dead")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    assert_eq!(dead["kind"], "open311");
    assert_eq!(
        dead["service_request_id"].as_str(),
        Some(id.to_string().as_str())
    );
    assert_eq!(dead["attempts"], 1, "a 4xx is not retried: {dead}");
    let why = dead["last_error"].as_str().unwrap();
    assert!(
        why.starts_with("HTTP 404") && why.contains("no_such_service"),
        "{why}"
    );
    assert_eq!(
        crm.tickets.list(&Default::default()).await.unwrap().len(),
        0
    );
    assert_eq!(
        city_ticket(city.http_addr, id).await["external_id"],
        Value::Null
    );
    assert_eq!(gauges(city.http_addr).await["ivr311_outbox_dead"], 1.0);

    // The admin fixes the mapping (a restart with the new config) and sends it again.
    city.shutdown().await;
    args.db = db;
    let city = start_server_with(args, city_config(crm.http_addr, &[])).await;
    let row = dead["id"].as_i64().unwrap();
    let (status, text) =
        admin_post(city.http_addr, &format!("/admin/outbox/{row}/retry"), "").await;
    assert_eq!(status, 200, "{text}");
    until_forwarded(city.http_addr, id, Duration::from_secs(10)).await;
    assert_eq!(crm_count(&crm, "mapped wrong").await, 1);
    // Only a dead row can be sent again.
    let (status, _) = admin_post(city.http_addr, &format!("/admin/outbox/{row}/retry"), "").await;
    assert_eq!(status, 404);
    // The outbox is the admin's: no token, no answer.
    let (status, _) = http(city.http_addr, "GET", "/admin/outbox", &[], b"").await;
    assert!(matches!(status, 401 | 403), "{status}");
    city.shutdown().await;
    crm.shutdown().await;
}

/// What a webhook receiver got: headers of interest and the body.
#[derive(Debug, Clone)]
struct Delivery {
    signature: String,
    event: String,
    body: String,
}

/// A webhook receiver (hyper): answers `fail_first` requests with 503, then 204.
async fn receiver(fail_first: usize) -> (SocketAddr, Arc<Mutex<Vec<Delivery>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        let seen = seen.clone();
                        async move {
                            let header = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            let (signature, event) =
                                (header("x-311-signature"), header("x-311-event"));
                            let body = req.into_body().collect().await?.to_bytes();
                            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let code = if n < fail_first { 503 } else { 204 };
                            if code == 204 {
                                store.lock().unwrap().push(Delivery {
                                    signature,
                                    event,
                                    body: String::from_utf8_lossy(&body).into_owned(),
                                });
                            }
                            let resp = hyper::Response::builder()
                                .status(code)
                                .body(http_body_util::Full::new(bytes::Bytes::new()))
                                .unwrap();
                            Ok::<_, hyper::Error>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, got)
}

/// The README's recipe: HMAC-SHA256 of "{t}.{body}" under the secret, hex, as `v1`.
fn verify(secret: &str, header: &str, body: &str) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x),
            Some(("v1", x)) => v1 = Some(x),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let fresh = t
        .parse::<i64>()
        .is_ok_and(|t| (time::OffsetDateTime::now_utc().unix_timestamp() - t).abs() < 300);
    fresh && want == v1
}

#[tokio::test]
async fn status_changed_on_the_crm_flows_back_and_webhooks_are_signed_with_only_what_was_asked() {
    let crm = start_crm("127.0.0.1:0".parse().unwrap(), temp_db("crm-status")).await;
    let (hook, got) = receiver(1).await;
    let mut cfg = city_config(crm.http_addr, &[]);
    cfg.webhooks = vec![WebhookConfig {
        url: format!("http://{hook}/311"),
        secret: "whsec-test".into(),
        events: vec![
            ivr311::dispatch::outbox::Event::RequestCreated,
            ivr311::dispatch::outbox::Event::RequestUpdated,
        ],
        fields: vec![
            "service_request_id".into(),
            "status".into(),
            "status_notes".into(),
        ],
    }];
    let city = start_server(cfg).await;
    let id = file_by_api(city.http_addr, "crew will fix").await;
    let external = until_forwarded(city.http_addr, id, Duration::from_secs(10)).await;

    // The crew closes it in the CRM; the city's ticket follows.
    let (status, text) = admin_post(
        crm.http_addr,
        &format!("/admin/requests/{external}"),
        r#"{"status":"closed","status_notes":"Filled by crew 7"}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let t = until(
        "the CRM's status comes back",
        Duration::from_secs(10),
        async || {
            let t = city_ticket(city.http_addr, id).await;
            (t["status"] == "closed").then_some(t)
        },
    )
    .await;
    assert_eq!(t["status_notes"], "Filled by crew 7");
    // Open311 says what the crew wrote, as the phone lookup does.
    let (_, text) = http(
        city.http_addr,
        "GET",
        &format!("/open311/v2/requests/{id}.json"),
        &[],
        b"",
    )
    .await;
    assert!(text.contains("Filled by crew 7"), "{text}");

    // The webhook: created (after a 503 and a retry), then updated; signed; only the
    // configured fields, never the resident's email.
    let deliveries = until(
        "both webhooks arrive",
        Duration::from_secs(15),
        async || {
            let d = got.lock().unwrap().clone();
            (d.len() >= 2).then_some(d)
        },
    )
    .await;
    let events: Vec<&str> = deliveries.iter().map(|d| d.event.as_str()).collect();
    assert_eq!(events, ["request.created", "request.updated"]);
    for d in &deliveries {
        assert!(verify("whsec-test", &d.signature, &d.body), "{d:?}");
        assert!(!verify("wrong-secret", &d.signature, &d.body));
        let v: Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(v["event"], d.event.as_str());
        let request = v["request"].as_object().unwrap();
        let mut keys: Vec<&str> = request.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["service_request_id", "status", "status_notes"],
            "{v}"
        );
        assert_eq!(request["service_request_id"], id.to_string());
        assert!(!d.body.contains("resident@example.org"), "{}", d.body);
    }
    let updated: Value = serde_json::from_str(&deliveries[1].body).unwrap();
    assert_eq!(updated["request"]["status"], "closed");
    assert_eq!(updated["request"]["status_notes"], "Filled by crew 7");
    city.shutdown().await;
    crm.shutdown().await;
}

/// One request a fake CRM got.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    idempotency_key: String,
}

/// A scripted GeoReport server: `answer(n, method, path)` gives the status, the body and how
/// long to wait first, for the n-th request (from 0).
async fn fake_crm(
    answer: fn(usize, &str, &str) -> (u16, &'static str, Duration),
) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_owned();
                            let idempotency_key = req
                                .headers()
                                .get("idempotency-key")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let _ = req.into_body().collect().await?;
                            let n = {
                                let mut log = log.lock().unwrap();
                                log.push(Seen {
                                    method: method.clone(),
                                    path: path.clone(),
                                    idempotency_key,
                                });
                                log.len() - 1
                            };
                            let (status, body, wait) = answer(n, &method, &path);
                            tokio::time::sleep(wait).await;
                            Ok::<_, hyper::Error>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                        body.as_bytes(),
                                    )))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_slow_crm_is_retried_and_a_token_it_answers_is_resolved_later() {
    let (crm, seen) = fake_crm(|n, method, path| match (method, path) {
        // The first POST takes longer than the timeout; the second gets a token.
        ("POST", _) if n == 0 => (200, r#"[{"token":"tok-1"}]"#, Duration::from_secs(4)),
        ("POST", _) => (200, r#"[{"token":"tok-1"}]"#, Duration::ZERO),
        ("GET", "/open311/v2/tokens/tok-1.json") => (
            200,
            r#"[{"service_request_id":"CRM-77","token":"tok-1"}]"#,
            Duration::ZERO,
        ),
        _ => (200, "[]", Duration::ZERO),
    })
    .await;
    let mut cfg = city_config(crm, &[]);
    cfg.forward.timeout_seconds = 1;
    let city = start_server(cfg).await;
    let id = file_by_api(city.http_addr, "slow crm").await;
    let external = until_forwarded(city.http_addr, id, Duration::from_secs(15)).await;
    assert_eq!(external, "CRM-77");
    let seen = seen.lock().unwrap().clone();
    let posts: Vec<&Seen> = seen.iter().filter(|s| s.method == "POST").collect();
    assert_eq!(
        posts.len(),
        2,
        "timed out once, then acknowledged: {seen:?}"
    );
    for p in &posts {
        assert_eq!(p.path, "/open311/v2/requests.json");
        assert_eq!(p.idempotency_key, format!("ivr311-{id}"));
    }
    let done = outbox(city.http_addr, "?state=done").await;
    assert_eq!(done.len(), 1, "{done:?}");
    city.shutdown().await;
}

#[tokio::test]
async fn garbage_answers_are_retried_then_dead_lettered() {
    let (crm, seen) = fake_crm(|_, method, _| match method {
        "POST" => (200, "<html>down for maintenance</html>", Duration::ZERO),
        _ => (200, "[]", Duration::ZERO),
    })
    .await;
    let mut cfg = city_config(crm, &[]);
    cfg.forward.garbage_attempts = 3;
    let city = start_server(cfg).await;
    let id = file_by_api(city.http_addr, "garbage").await;
    let dead = until(
        "dead-lettered after 3 answers",
        Duration::from_secs(15),
        async || {
            outbox(city.http_addr, "?state=dead")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    assert_eq!(dead["attempts"], 3, "{dead}");
    assert!(
        dead["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not a GeoReport answer")),
        "{dead}"
    );
    let posts = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "POST")
        .count();
    assert_eq!(posts, 3);
    assert_eq!(
        city_ticket(city.http_addr, id).await["external_id"],
        Value::Null
    );
    city.shutdown().await;
}
