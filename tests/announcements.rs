//! Integration: emergency announcements set over the admin API, heard by callers of the
//! shipped menu right after the 911 screening (never before it), skippable, with a temporary
//! main-menu key that files a request of a temporary service listed in Open311 while the
//! announcement lasts; they survive a restart and end at their end time (injected clock).

mod common;

use base64::Engine as _;
use common::*;
use ivr311::config::{FileConfig, ServeArgs};
use ivr311::media::g711::Codec;
use ivr311::media::prompt::Prompt;
use ivr311::menu::schedule::WallClock;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

/// A 3-second upward sweep, 8 kHz mono 16-bit: every 20 ms frame of it differs from every
/// other, and from every recorded prompt.
fn sweep_wav() -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = std::io::Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
    let mut phase = 0f64;
    for i in 0..24_000 {
        let f = 300.0 + 1200.0 * f64::from(i) / 24_000.0;
        phase += std::f64::consts::TAU * f / 8000.0;
        w.write_sample((phase.sin() * 12_000.0) as i16).unwrap();
    }
    w.finalize().unwrap();
    out.into_inner()
}

/// Recognises the frames of the uploaded sweep as the server sends them (PCMU).
struct SweepEar(HashSet<Vec<u8>>);

impl SweepEar {
    fn new() -> SweepEar {
        let p = Prompt::from_wav_bytes("sweep", Path::new("sweep.wav"), &sweep_wav()).unwrap();
        let mut frames = HashSet::new();
        for i in 0..p.frames() {
            let mut f = [0u8; 160];
            p.frame(Codec::Pcmu, i, &mut f);
            frames.insert(f.to_vec());
        }
        SweepEar(frames)
    }

    fn heard(&self, payloads: &[Vec<u8>]) -> usize {
        payloads.iter().filter(|p| self.0.contains(*p)).count()
    }

    /// The index of the first frame of the sweep in `payloads`.
    fn first(&self, payloads: &[Vec<u8>]) -> Option<usize> {
        payloads.iter().position(|p| self.0.contains(p))
    }
}

fn announcement(starts_at: &str, ends_at: &str) -> serde_json::Value {
    serde_json::json!({
        "messages": {"en": {
            "text": "A water main broke on Main Street. Press 7 to report storm debris.",
            "wav_base64": base64::engine::general_purpose::STANDARD.encode(sweep_wav()),
        }},
        "starts_at": starts_at,
        "ends_at": ends_at,
        "entries": [{"key": "7", "ticket": {
            "service": "storm_debris",
            "name": "Storm debris",
            "description": "Branches and debris left by the storm on a street or sidewalk.",
            "group": "Storm response",
        }}],
    })
}

async fn post(http: std::net::SocketAddr, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (code, body) = common::http(
        http,
        "POST",
        "/admin/announcements",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    (code, serde_json::from_str(&body).unwrap_or_default())
}

async fn get_json(http: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let (code, body) = common::http(http, "GET", path, &[], b"").await;
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The service codes of the public Open311 services list.
async fn open311_codes(http: std::net::SocketAddr) -> Vec<String> {
    let v = get_json(http, "/open311/v2/services.json").await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["service_code"].as_str().unwrap().to_owned())
        .collect()
}

/// Call, choose English, and listen to the screening before pressing `key` there; returns
/// everything heard up to and including `then` of listening after the key.
async fn through_screening(ua: &mut TestUa, key: char, then: Duration) -> Vec<Vec<u8>> {
    assert_eq!(ua.call("0 101").await.code, 200);
    let mut heard = ua.until_audio().await;
    ua.press('1').await;
    heard.extend(
        ua.listen_for("en", "screening", Duration::from_secs(15))
            .await,
    );
    ua.press(key).await;
    heard.extend(ua.listen(then).await);
    heard
}

fn clock(at: &str) -> WallClock {
    WallClock::starting_at(at.parse().unwrap())
}

#[tokio::test]
async fn heard_after_screening_skipped_with_pound_and_its_key_files_the_temporary_service() {
    let srv = start_server(FileConfig::default()).await;
    let (code, body) = post(
        srv.http_addr,
        &announcement("2026-12-07T14:00:00Z", "2026-12-08T02:00:00Z"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["state"], "active", "{body}");

    let mut ua = TestUa::udp(srv.sip_addr).await;
    let sweep = SweepEar::new();
    let intro = PromptEar::new("en", &["screening", "announcement_intro"], Codec::Pcmu);
    let mut heard = through_screening(&mut ua, '1', Duration::ZERO).await;
    heard.extend(
        ua.listen_until("the announcement", Duration::from_secs(15), |h| {
            sweep.heard(h) >= 25
        })
        .await,
    );
    // Screening first, then the introduction ("... To skip it, press pound."), then the
    // message.
    let order = prompts_heard(&intro, &heard);
    assert_eq!(order, vec!["screening", "announcement_intro"], "{order:?}");
    let screening_ear = PromptEar::new("en", &["screening"], Codec::Pcmu);
    let last_screening = heard
        .iter()
        .rposition(|p| screening_ear.frames_heard(std::slice::from_ref(p)) == 1)
        .unwrap();
    assert!(sweep.first(&heard).unwrap() > last_screening);

    // Pound skips the rest: the main menu follows at once.
    ua.press('#').await;
    let after = ua
        .listen_for("en", "main_menu", Duration::from_secs(5))
        .await;
    let main = PromptEar::new("en", &["main_menu"], Codec::Pcmu);
    assert!(main.frames_heard(&after) >= 10, "main menu after #");
    let main_at = after
        .iter()
        .position(|p| main.frames_heard(std::slice::from_ref(p)) == 1)
        .unwrap();
    assert_eq!(
        sweep.heard(&after[main_at..]),
        0,
        "the announcement stopped when # was pressed"
    );
    assert!(
        sweep.heard(&heard) + sweep.heard(&after) < 140,
        "not the whole 3 s message"
    );

    // Its temporary key 7 files a storm debris request.
    ua.press('7').await;
    ua.listen_for("en", "enter_zip", Duration::from_secs(10))
        .await;
    ua.keys("94103").await;
    ua.skip_description("en").await;
    let tickets = until(
        "the storm debris request",
        Duration::from_secs(15),
        || async {
            let all = srv.tickets.list(&Default::default()).await.unwrap();
            (!all.is_empty()).then_some(all)
        },
    )
    .await;
    assert_eq!(tickets.len(), 1);
    assert_eq!(tickets[0].service_code, "storm_debris");
    assert_eq!(tickets[0].service_name, "Storm debris");
    assert_eq!(tickets[0].zipcode.as_deref(), Some("94103"));
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_caller_pressing_9_at_screening_reaches_911_without_hearing_it() {
    let srv = start_server(FileConfig::default()).await;
    let (code, body) = post(
        srv.http_addr,
        &announcement("2026-12-07T14:00:00Z", "2026-12-08T02:00:00Z"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let heard = through_screening(&mut ua, '9', Duration::from_millis(3000)).await;
    let ear = PromptEar::new(
        "en",
        &["connecting_911", "emergency_announce", "announcement_intro"],
        Codec::Pcmu,
    );
    let got = prompts_heard(&ear, &heard);
    assert_eq!(
        got.first().map(String::as_str),
        Some("connecting_911"),
        "{got:?}"
    );
    assert!(!got.contains(&"announcement_intro".to_owned()), "{got:?}");
    assert_eq!(
        SweepEar::new().heard(&heard),
        0,
        "no announcement before 911"
    );
    ua.expect_request("BYE", Duration::from_secs(20)).await;
    // It was active all along: a caller pressing 1 at screening hears it.
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let sweep = SweepEar::new();
    through_screening(&mut ua, '1', Duration::ZERO).await;
    ua.listen_until("the announcement", Duration::from_secs(15), |h| {
        sweep.heard(h) >= 25
    })
    .await;
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn survives_a_restart_lists_its_service_while_active_and_ends_on_time_or_when_deleted() {
    let args = serve_args();
    let start = |args: &ServeArgs, at: &str| {
        let (args, c) = (args.clone(), clock(at));
        async move { start_server_at(args, FileConfig::default(), c).await }
    };
    // Before it starts: listed as scheduled, its service not yet public.
    let srv = start(&args, "2026-12-07T13:00:00Z").await;
    let (code, body) = post(
        srv.http_addr,
        &announcement("2026-12-07T14:00:00Z", "2026-12-07T18:00:00Z"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["state"], "scheduled");
    let id = body["id"].as_i64().unwrap();
    assert!(!open311_codes(srv.http_addr)
        .await
        .contains(&"storm_debris".into()));
    srv.shutdown().await;

    // A restart at 15:00: loaded from the database, active, heard, and its service listed.
    let srv = start(&args, "2026-12-07T15:00:00Z").await;
    let list = get_json(srv.http_addr, "/admin/announcements").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["state"], "active");
    assert_eq!(list[0]["created_by"], "admin");
    assert!(open311_codes(srv.http_addr)
        .await
        .contains(&"storm_debris".into()));
    let definition = "/open311/v2/services/storm_debris.json";
    let (code, _) = common::http(srv.http_addr, "GET", definition, &[], b"").await;
    assert_eq!(code, 200, "its definition while it lasts");
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let sweep = SweepEar::new();
    through_screening(&mut ua, '1', Duration::ZERO).await;
    ua.listen_until(
        "the announcement after a restart",
        Duration::from_secs(15),
        |h| sweep.heard(h) >= 25,
    )
    .await;
    ua.bye().await;
    srv.shutdown().await;

    // After its end time: not heard, not listed, its service gone.
    let srv = start(&args, "2026-12-07T18:00:01Z").await;
    assert_eq!(
        get_json(srv.http_addr, "/admin/announcements").await,
        serde_json::json!([])
    );
    assert!(!open311_codes(srv.http_addr)
        .await
        .contains(&"storm_debris".into()));
    let (code, _) = common::http(srv.http_addr, "GET", definition, &[], b"").await;
    assert_eq!(code, 404, "no definition after it");
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let heard = through_screening(&mut ua, '1', Duration::ZERO).await;
    let heard = [
        heard,
        ua.listen_for("en", "main_menu", Duration::from_secs(10))
            .await,
    ]
    .concat();
    let ear = PromptEar::new("en", &["announcement_intro", "main_menu"], Codec::Pcmu);
    assert_eq!(prompts_heard(&ear, &heard), vec!["main_menu"]);
    assert_eq!(sweep.heard(&heard), 0);
    ua.bye().await;

    // Ending one early: DELETE takes it off at once.
    let (code, body) = post(
        srv.http_addr,
        &announcement("2026-12-07T18:00:00Z", "2026-12-08T18:00:00Z"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let second = body["id"].as_i64().unwrap();
    assert_ne!(second, id);
    assert!(open311_codes(srv.http_addr)
        .await
        .contains(&"storm_debris".into()));
    let path = format!("/admin/announcements/{second}");
    let (code, _) = common::http(
        srv.http_addr,
        "DELETE",
        &path,
        &[("Content-Type", "application/json")],
        b"",
    )
    .await;
    assert_eq!(code, 200);
    assert!(!open311_codes(srv.http_addr)
        .await
        .contains(&"storm_debris".into()));
    assert_eq!(
        get_json(srv.http_addr, "/admin/announcements").await,
        serde_json::json!([])
    );
    let (code, _) = common::http(
        srv.http_addr,
        "DELETE",
        &path,
        &[("Content-Type", "application/json")],
        b"",
    )
    .await;
    assert_eq!(code, 404, "ended already");
    srv.shutdown().await;
}

#[tokio::test]
async fn refused_keys_times_languages_and_text_that_cannot_be_spoken() {
    // Without speech, text alone cannot be heard (tests/speech.rs has it spoken).
    let mut file = FileConfig::default();
    file.speech.enabled = false;
    let srv = start_server(file).await;
    let base = announcement("2026-12-07T14:00:00Z", "2026-12-08T02:00:00Z");
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        f(&mut v);
        v
    };
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (with(&|v| v["entries"][0]["key"] = "9".into()), "911"),
        (
            with(&|v| v["entries"][0]["key"] = "8".into()),
            "crisis line",
        ),
        (
            with(&|v| v["entries"][0]["key"] = "1".into()),
            "main menu uses it",
        ),
        (
            with(&|v| v["ends_at"] = "2026-12-07T13:00:00Z".into()),
            "after starts_at",
        ),
        (
            with(&|v| {
                v["messages"]["fr"] =
                    serde_json::json!({"wav_base64": v["messages"]["en"]["wav_base64"].clone()})
            }),
            "languages",
        ),
        (
            with(&|v| v["messages"]["en"] = serde_json::json!({"text": "Boil your water."})),
            "cannot speak text",
        ),
        (
            with(&|v| v["entries"][0]["ticket"]["service"] = "pothole".into()),
            "service of the menu",
        ),
        (
            with(&|v| v["messages"]["en"]["wav_base64"] = "bm90IGEgd2F2".into()),
            "wav_base64",
        ),
    ];
    for (body, why) in cases {
        let (code, answer) = post(srv.http_addr, &body).await;
        assert_eq!(code, 422, "{why}: {answer}");
        assert!(
            answer["errors"].to_string().contains(why),
            "{why}: {answer}"
        );
    }
    assert_eq!(
        get_json(srv.http_addr, "/admin/announcements").await,
        serde_json::json!([])
    );
    // With an admin token, it is required.
    srv.shutdown().await;
    let mut file = FileConfig::default();
    file.admin.token = Some("s3cret-token-for-tests".into());
    let srv = start_server(file).await;
    let (code, _) = post(srv.http_addr, &base).await;
    assert_eq!(code, 403);
    srv.shutdown().await;
}
