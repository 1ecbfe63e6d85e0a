//! Several lines on one server (`lines:` in the settings): the number the caller dialled
//! chooses the menu, read from P-Called-Party-ID and Diversion (from a trusted trunk), the
//! Request-URI and To; each line's menu is reloaded apart; metrics are labelled by line.

mod common;

use common::*;
use ivr311::call::lines::LineConfig;
use ivr311::config::FileConfig;
use ivr311::media::g711::Codec;
use std::path::PathBuf;
use std::time::Duration;

const JSON: [(&str, &str); 1] = [("Content-Type", "application/json")];

/// The default line answers with the shipped menu (language choice first); the Spanish line
/// with menus/spanish-direct.yaml (the Spanish 911 warning first).
fn two_lines(spanish_menu: PathBuf) -> FileConfig {
    FileConfig {
        lines: vec![
            LineConfig {
                number: "311".into(),
                menu: repo().join("menus/311.yaml"),
            },
            LineConfig {
                number: "+1 (311) 555-0199".into(),
                menu: spanish_menu,
            },
        ],
        ..FileConfig::default()
    }
}

fn spanish_copy() -> PathBuf {
    let p = std::env::temp_dir().join(format!("ivr311-spanish-{}.yaml", rand::random::<u64>()));
    std::fs::copy(repo().join("menus/spanish-direct.yaml"), &p).unwrap();
    p
}

/// What a caller hears first: `english` (the language menu) or `spanish` (the Spanish 911
/// warning), heard in the first few seconds of the call.
async fn greeting(ua: &mut TestUa) -> &'static str {
    let english = PromptEar::new("en", &["language_menu"], Codec::Pcmu);
    let spanish = PromptEar::new("es", &["screening"], Codec::Pcmu);
    let heard = ua
        .listen_until("a greeting", Duration::from_secs(10), |h| {
            english.frames_heard(h) >= 10 || spanish.frames_heard(h) >= 10
        })
        .await;
    match (english.frames_heard(&heard), spanish.frames_heard(&heard)) {
        (e, 0) if e > 0 => "english",
        (0, s) if s > 0 => "spanish",
        other => panic!("both greetings heard: {other:?}"),
    }
}

/// Calls with `ruri` as the Request-URI user, `to` in To and `extra` header lines; the
/// greeting heard.
async fn call_hearing(
    srv: &ivr311::server::RunningServer,
    ruri: &str,
    to: &str,
    extra: &str,
) -> &'static str {
    let mut ua = TestUa::udp(srv.sip_addr).await;
    ua.request_user = ruri.into();
    ua.to_user = to.into();
    let (_, r) = ua.call_with("0 101", extra).await;
    assert_eq!(r.code, 200);
    let g = greeting(&mut ua).await;
    ua.bye().await;
    g
}

#[tokio::test]
async fn two_lines_answer_with_their_own_menus() {
    let srv = start_server(two_lines(spanish_copy())).await;
    assert_eq!(call_hearing(&srv, "311", "311", "").await, "english");
    // The Spanish line, dialled in E.164, national and national-with-1 forms.
    for number in ["+13115550199", "3115550199", "13115550199"] {
        assert_eq!(
            call_hearing(&srv, number, number, "").await,
            "spanish",
            "{number}"
        );
    }
    // A number no line has: the default line (--menu).
    assert_eq!(
        call_hearing(&srv, "5550100", "5550100", "").await,
        "english"
    );
    // Metrics say which line each call dialled.
    let m = until("the calls counted", Duration::from_secs(10), async || {
        let m = metrics(srv.http_addr).await;
        let sum = |line: &str| -> f64 {
            m.iter()
                .filter(|(k, _)| {
                    k.starts_with("ivr311_line_calls_total{")
                        && k.contains(&format!("line=\"{line}\""))
                })
                .map(|(_, v)| v)
                .sum()
        };
        let got = (sum("311"), sum("+1 (311) 555-0199"), sum("default"));
        (got == (1.0, 3.0, 1.0)).then_some(got)
    })
    .await;
    assert_eq!(m, (1.0, 3.0, 1.0));
    srv.shutdown().await;
}

#[tokio::test]
async fn the_trunks_called_party_headers_win_over_the_request_uri() {
    let mut file = two_lines(spanish_copy());
    file.trunks.allow = vec!["127.0.0.1".parse().unwrap()];
    let srv = start_server(file).await;
    // The carrier rewrote the Request-URI to our trunk number; P-Called-Party-ID keeps what
    // the caller dialled.
    let pcpi = "P-Called-Party-ID: <sip:+13115550199@carrier.example>\r\n";
    assert_eq!(
        call_hearing(&srv, "+15550009999", "+15550009999", pcpi).await,
        "spanish"
    );
    // P-Called-Party-ID first, even when the Request-URI names another line.
    assert_eq!(call_hearing(&srv, "311", "311", pcpi).await, "spanish");
    // Forwarded: the original number is the last Diversion entry, before the Request-URI.
    let diversion = "Diversion: <sip:5550001@city.example>;reason=no-answer, \
                     <sip:3115550199@city.example>;reason=unconditional\r\n";
    assert_eq!(call_hearing(&srv, "311", "311", diversion).await, "spanish");
    // No trunk header: the Request-URI, then To.
    assert_eq!(call_hearing(&srv, "3115550199", "311", "").await, "spanish");
    assert_eq!(
        call_hearing(&srv, "s", "3115550199", "").await,
        "spanish",
        "To, when the Request-URI is no line"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn called_party_headers_from_an_untrusted_source_are_ignored() {
    // No trunks.allow: nobody vouches for P-Called-Party-ID or Diversion.
    let srv = start_server(two_lines(spanish_copy())).await;
    let pcpi = "P-Called-Party-ID: <sip:+13115550199@carrier.example>\r\n";
    assert_eq!(call_hearing(&srv, "311", "311", pcpi).await, "english");
    let diversion = "Diversion: <sip:3115550199@city.example>;reason=unconditional\r\n";
    assert_eq!(call_hearing(&srv, "311", "311", diversion).await, "english");
    srv.shutdown().await;
}

#[tokio::test]
async fn a_broken_line_menu_is_refused_on_reload_while_both_lines_keep_answering() {
    let spanish = spanish_copy();
    let srv = start_server(two_lines(spanish.clone())).await;
    let good = std::fs::read_to_string(&spanish).unwrap();
    let broken = good.replacen("{goto: streets}", "{goto: streetz}", 1);
    assert_ne!(good, broken);
    std::fs::write(&spanish, &broken).unwrap();
    let (code, body) = http(srv.http_addr, "POST", "/admin/menu/reload", &JSON, b"").await;
    assert_eq!(code, 422, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let errors: Vec<&str> = (v["errors"].as_array().unwrap().iter())
        .filter_map(|e| e.as_str())
        .collect();
    let prefix = format!("{}:", spanish.display());
    assert!(
        errors.iter().any(|e| e.starts_with(&prefix)
            && e.contains("streetz")
            && e[prefix.len()..]
                .split(':')
                .take(2)
                .all(|n| n.parse::<u32>().is_ok())),
        "path:line:col of the broken menu: {errors:?}"
    );
    assert!(
        errors.iter().all(|e| e.starts_with(&prefix)),
        "only the broken menu is refused: {errors:?}"
    );
    // Both lines still answer, the Spanish one with its old menu.
    assert_eq!(call_hearing(&srv, "311", "311", "").await, "english");
    assert_eq!(
        call_hearing(&srv, "3115550199", "3115550199", "").await,
        "spanish"
    );
    let mut ua = TestUa::udp(srv.sip_addr).await;
    ua.request_user = "3115550199".into();
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("11").await;
    let ear = PromptEar::new("es", &["streets_menu"], Codec::Pcmu);
    ua.listen_until(
        "the streets menu of the old Spanish menu",
        Duration::from_secs(10),
        |h| ear.frames_heard(h) > 0,
    )
    .await;
    ua.bye().await;
    // Fixed, it reloads.
    std::fs::write(&spanish, &good).unwrap();
    let (code, body) = http(srv.http_addr, "POST", "/admin/menu/reload", &JSON, b"").await;
    assert_eq!(code, 200, "{body}");
    srv.shutdown().await;
}
