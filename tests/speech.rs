//! Speech of dynamic text with espeak-ng (`src/media/tts.rs`): rendered at 8 kHz, spoken to a
//! caller who checks a request's status by phone and to every caller after screening when an
//! admin posts an announcement as text, and the fallback to recorded words when the library
//! cannot be loaded.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::tickets::{Channel, NewTicket, Status};
use ivr311::media::g711::Codec;
use ivr311::media::tts::{Speech, SpeechConfig};
use std::time::Duration;

/// Every recorded prompt's name in `lang`.
fn all_prompts(lang: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo().join("prompts").join(lang))
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "wav").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    v
}

fn peak(frame: &[u8]) -> u16 {
    let mut pcm = [0i16; 160];
    Codec::Pcmu.decode(frame, &mut pcm);
    pcm.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0)
}

/// Every 20 ms frame of every recorded English prompt, as sent in PCMU.
fn recorded_frames() -> std::collections::HashSet<Vec<u8>> {
    let store = prompts();
    let mut set = std::collections::HashSet::new();
    for n in all_prompts("en") {
        let p = store.get("en", &n).unwrap();
        for i in 0..p.frames() {
            let mut f = [0u8; 160];
            p.frame(Codec::Pcmu, i, &mut f);
            set.insert(f.to_vec());
        }
    }
    set
}

/// 20 ms frames from the status on (its first recorded frame) that are loud (speech, not
/// line noise) and belong to no recorded prompt.
fn unrecorded_speech_frames(heard: &[Vec<u8>]) -> usize {
    unrecorded_after(heard, "ticket_status_closed")
}

/// Loud frames of no recorded prompt, from the first frame of recorded prompt `from` on.
fn unrecorded_after(heard: &[Vec<u8>], from: &str) -> usize {
    let ear = PromptEar::new("en", &[from], Codec::Pcmu);
    let at = heard
        .iter()
        .position(|f| ear.frames_heard(std::slice::from_ref(f)) > 0)
        .unwrap_or_else(|| panic!("{from} heard"));
    let recorded = recorded_frames();
    heard[at..]
        .iter()
        .filter(|f| peak(f) >= 1000 && !recorded.contains(*f))
        .count()
}

#[tokio::test]
async fn espeak_renders_english_and_spanish_at_8_khz() {
    let speech = Speech::start(&SpeechConfig::default());
    for (lang, text) in [
        ("en", "The pothole on Main Street was filled by crew seven."),
        (
            "es",
            "El bache de la calle Mayor fue reparado por la cuadrilla siete.",
        ),
    ] {
        let p = speech.render(lang, text).await.unwrap_or_else(|| {
            panic!("{lang}: espeak-ng rendered nothing (libespeak-ng1 installed?)")
        });
        let pcm = p.pcm();
        let seconds = pcm.len() as f64 / 8000.0;
        // About 10 to 15 syllables a second at espeak's default rate: these sentences take
        // 2 to 6 s, with 100 ms of silence kept at each end.
        assert!((1.5..7.0).contains(&seconds), "{lang}: {seconds} s");
        let rms =
            (pcm.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / pcm.len() as f64).sqrt();
        assert!(rms > 500.0, "{lang}: rms {rms}: silent?");
        // Decoded from G.711 as a phone hears it, most 20 ms frames carry sound.
        let frames = p.frames();
        let loud = (0..frames)
            .filter(|&i| {
                let mut f = [0u8; 160];
                p.frame(Codec::Pcmu, i, &mut f);
                peak(&f) >= 1000
            })
            .count();
        assert!(
            loud * 2 > frames,
            "{lang}: {loud} of {frames} frames audible"
        );
        // The same text again is the cached prompt.
        let again = speech.render(lang, text).await.unwrap();
        assert!(std::sync::Arc::ptr_eq(&p, &again));
    }
}

/// Files a request whose status notes say something, closed, as the city would update it.
async fn request_with_notes(srv: &ivr311::server::RunningServer, notes: &str) -> u64 {
    let t = srv
        .tickets
        .file(NewTicket {
            service_code: "pothole".into(),
            service_name: "Pothole".into(),
            channel: Channel::Web,
            ..Default::default()
        })
        .await
        .unwrap();
    srv.tickets
        .update_status(t.service_request_id, Status::Closed, Some(notes))
        .await
        .unwrap()
        .unwrap();
    t.service_request_id
}

/// Calls, checks the status of request `id` in English and listens until the main menu is
/// offered again (the status read to its end).
async fn hear_status(srv: &ivr311::server::RunningServer, id: u64) -> Vec<Vec<u8>> {
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("116").await;
    ua.keys(&id.to_string()).await;
    let menu = PromptEar::new("en", &["main_menu_short"], Codec::Pcmu);
    let heard = ua
        .listen_until(
            "the main menu after the status",
            Duration::from_secs(30),
            |h| menu.frames_heard(h) > 0,
        )
        .await;
    ua.bye().await;
    heard
}

#[tokio::test]
async fn a_caller_checking_a_status_hears_its_notes_spoken() {
    let srv = start_server(FileConfig::default()).await;
    let id = request_with_notes(
        &srv,
        "Filled by crew seven on Tuesday; the road is open again.",
    )
    .await;
    let heard = hear_status(&srv, id).await;
    let names = all_prompts("en");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ear = PromptEar::new("en", &names, Codec::Pcmu);
    let played = ear.playbacks(&heard);
    let closed = played.iter().position(|p| p == "ticket_status_closed");
    let today = played.iter().position(|p| p == "updated_today");
    assert!(
        closed.is_some() && today > closed,
        "recorded status first: {played:?}"
    );
    // The date and the notes are spoken: seconds of audio that no recorded prompt holds.
    let spoken = unrecorded_speech_frames(&heard);
    assert!(
        spoken >= 100,
        "{spoken} frames of speech heard; recorded: {played:?}"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn without_the_library_the_recorded_status_is_said() {
    let mut file = FileConfig::default();
    file.speech.library = "/nonexistent/libespeak-ng.so.1".into();
    let srv = start_server(file).await;
    let id = request_with_notes(&srv, "Filled by crew seven.").await;
    let heard = hear_status(&srv, id).await;
    let names = all_prompts("en");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ear = PromptEar::new("en", &names, Codec::Pcmu);
    let played = ear.playbacks(&heard);
    let closed = played.iter().position(|p| p == "ticket_status_closed");
    let today = played.iter().position(|p| p == "updated_today");
    assert!(closed.is_some() && today > closed, "{played:?}");
    let spoken = unrecorded_speech_frames(&heard);
    assert!(
        spoken < 25,
        "{spoken} unrecorded loud frames without speech; {played:?}"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn a_render_past_its_time_limit_answers_none_and_its_late_result_is_cached() {
    let speech = Speech::start(&SpeechConfig {
        timeout_ms: 1,
        ..SpeechConfig::default()
    });
    let text = "Crews are clearing storm debris on every street of the fourth district this week.";
    assert!(
        speech.render("en", text).await.is_none(),
        "synthesis takes longer than a millisecond"
    );
    // A synthesis already under way when its caller gave up still fills the cache: asked
    // again, the text is soon answered from it.
    let p = until(
        "the late result cached",
        Duration::from_secs(10),
        async || speech.render("en", text).await,
    )
    .await;
    assert!(p.pcm().len() > 8000, "{} samples", p.pcm().len());
}

#[tokio::test]
async fn an_announcement_posted_as_text_is_spoken_to_callers_after_screening() {
    let srv = start_server(FileConfig::default()).await;
    let body = serde_json::json!({
        "messages": {"en": {"text": "A water main broke on Main Street. Boil your water before \
            drinking it until further notice. Crews expect to finish by Friday."}},
        "starts_at": "2026-12-07T14:00:00Z",
        "ends_at": "2026-12-08T02:00:00Z",
    });
    let (code, answer) = http(
        srv.http_addr,
        "POST",
        "/admin/announcements",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(code, 201, "{answer}");
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.press('1').await;
    ua.listen_for("en", "screening", Duration::from_secs(15))
        .await;
    ua.press('1').await;
    let menu = PromptEar::new("en", &["main_menu"], Codec::Pcmu);
    let heard = ua
        .listen_until(
            "the main menu after the announcement",
            Duration::from_secs(40),
            |h| menu.frames_heard(h) > 0,
        )
        .await;
    // The introduction, then seconds of speech no recorded prompt holds (not the recorded
    // fallback), then the main menu.
    let names = all_prompts("en");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let played = PromptEar::new("en", &names, Codec::Pcmu).playbacks(&heard);
    assert!(
        played.iter().any(|p| p == "announcement_intro")
            && !played.iter().any(|p| p == "announcement_fallback"),
        "{played:?}"
    );
    let spoken = unrecorded_after(&heard, "announcement_intro");
    assert!(
        spoken >= 150,
        "{spoken} frames of speech heard; recorded: {played:?}"
    );
    ua.bye().await;
    srv.shutdown().await;
}
