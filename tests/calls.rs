//! Integration: the real server on loopback port 0, called by a Rust test UA over real SIP and
//! RTP. What a caller would notice is what is asserted: the prompt heard, each key read back
//! once, hang-ups from either side, and that bad input never disturbs a call in progress.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::media::g711::Codec;
use ivr311::sip::message::Message;
use std::time::Duration;

const S: Duration = Duration::from_secs(1);

#[tokio::test]
async fn answers_with_the_language_menu_and_hears_each_key_once() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let ok = ua.call("0 8 101").await;
    assert_eq!(ok.code, 200);
    assert_eq!(ua.codec, Codec::Pcmu, "caller's first choice wins");
    assert!(ok.to.tag().is_some());
    assert!(!ok.contacts().is_empty(), "200 carries a Contact");

    let ear = PromptEar::new(
        "en",
        &["language_menu", "screening", "main_menu"],
        Codec::Pcmu,
    );
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert!(heard.len() >= 60, "about 50 packets/s: got {}", heard.len());
    assert_eq!(ear.playbacks(&heard), vec!["language_menu"]);

    // Barge-in: "1" stops the language menu and English screening plays. The End packet came
    // three times; had it counted twice, the second "1" would have skipped to the main menu.
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear.playbacks(&heard), vec!["screening"]);
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1200)).await;
    assert_eq!(ear.playbacks(&heard), vec!["main_menu"]);

    assert_eq!(health(srv.http_addr).await["live_calls"], 1);
    ua.bye().await;
    let h = until_no_calls(srv.http_addr).await;
    assert_eq!(h["status"], "ok");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    srv.shutdown().await;
}

#[tokio::test]
async fn a_delayed_offer_gets_our_offer_in_the_200_and_the_acks_answer_is_used() {
    // Many trunks and PBXs (Cisco CUCM's SIP trunks by default) send INVITE without SDP. Such
    // a call used to get 488; now the 200 offers both laws and RFC 4733 events, and the call
    // uses what the ACK answered: PCMA, and keys at 101.
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let ok = ua.call_delayed_offer(Some("8 101")).await;
    assert_eq!(ok.code, 200);
    let offer = String::from_utf8_lossy(&ok.body).to_string();
    for want in [
        "PCMU/8000",
        "PCMA/8000",
        "telephone-event/8000",
        "a=sendrecv",
    ] {
        assert!(offer.contains(want), "{want} offered: {offer}");
    }
    let ear = PromptEar::new("en", &["language_menu", "screening"], Codec::Pcma);
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(
        ear.playbacks(&heard),
        vec!["language_menu"],
        "heard in PCMA"
    );
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear.playbacks(&heard), vec!["screening"]);
    assert_eq!(ua.bye().await.code, 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_delayed_offer_whose_ack_answers_nothing_is_hung_up() {
    // RFC 3261 §13.3.1.4: with no answer to our offer there is no session; we say so with BYE
    // rather than leave the caller in silence.
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call_delayed_offer(None).await.code, 200);
    let bye = ua.expect_request("BYE", Duration::from_secs(3)).await;
    ua.answer_request(&bye).await;
    // Nothing lingers: no call, and the dialog is gone once the BYE is answered.
    health_until(srv.http_addr, "no call and no dialog left", |h| {
        h["live_calls"] == 0 && h["dialogs"] == 0
    })
    .await;
    srv.shutdown().await;
}

#[tokio::test]
async fn pcma_is_chosen_when_the_caller_prefers_it_and_info_digits_work() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("8 0 101").await.code, 200);
    assert_eq!(ua.codec, Codec::Pcma);
    let ear = PromptEar::new("en", &["language_menu", "screening"], Codec::Pcma);
    ua.until_audio().await;
    let info = ua.in_dialog(
        "INFO",
        "Content-Type: application/dtmf-relay\r\n",
        "Signal=1\r\nDuration=160\r\n",
    );
    ua.send_raw(&info).await;
    ua.expect_response("INFO", 200, S).await;
    let heard = ua.listen(Duration::from_millis(1000)).await;
    assert_eq!(ear.playbacks(&heard), vec!["screening"]);
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn retransmitted_invite_is_absorbed_not_a_second_call() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let sdp = ua.offer("0 101");
    let inv = ua.invite_bytes(&sdp);
    ua.send_raw(&inv).await;
    ua.send_raw(&inv).await;
    ua.send_raw(&inv).await;
    let mut oks = 0;
    let mut tags = std::collections::HashSet::new();
    while let Some(m) = ua.recv(Duration::from_millis(700)).await {
        if let Message::Response(r) = m {
            if r.code == 200 {
                oks += 1;
                tags.insert(r.to.tag().unwrap().to_owned());
            }
        }
    }
    assert!(oks >= 1);
    assert_eq!(tags.len(), 1, "one dialog, however many retransmissions");
    assert_eq!(health(srv.http_addr).await["live_calls"], 1);
    ua.to_tag = tags.into_iter().next();
    ua.ack().await;
    assert_eq!(ua.bye().await.code, 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn ok_is_retransmitted_until_ack() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let sdp = ua.offer("0 101");
    let inv = ua.invite_bytes(&sdp);
    ua.send_raw(&inv).await;
    // Do not ACK: the 200 must come again (timer G: 0.5 s, then 1 s later), and again.
    let mut oks = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while oks < 3 && std::time::Instant::now() < deadline {
        if let Some(Message::Response(r)) = ua.recv(Duration::from_millis(200)).await {
            if r.code == 200 {
                oks += 1;
                ua.to_tag = r.to.tag().map(str::to_owned);
            }
        }
    }
    assert_eq!(oks, 3, "200 sent and retransmitted twice");
    ua.ack().await;
    assert_eq!(ua.bye().await.code, 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn no_common_codec_gets_488() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let r = ua.call("18").await;
    assert_eq!(r.code, 488);
    assert!(r.header("Warning").is_some(), "488 says why");
    // The 488 is final: no call was started for it.
    assert_eq!(health(srv.http_addr).await["live_calls"], 0);
    srv.shutdown().await;
}

/// Some carrier and IMS trunks require reliable provisional responses (RFC 3262) on every
/// INVITE. We send them none on such a call, so there is nothing to PRACK: the call is answered
/// after the ring time, without a 180, and works. Other required extensions still get 420.
#[tokio::test]
async fn an_invite_that_requires_100rel_is_answered_without_an_unreliable_180() {
    let mut file = FileConfig::default();
    file.media.answer_after_ms = 400;
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let (provisional, ok) = ua
        .call_with("0 101", "Supported: 100rel, timer\r\nRequire: 100rel\r\n")
        .await;
    assert_eq!(ok.code, 200);
    assert!(
        provisional.iter().all(|c| *c == 100),
        "only 100 Trying before the 200: {provisional:?}"
    );
    ua.until_packets(20).await; // the call has audio
    ua.bye().await;

    // Without Require: 100rel the same server rings first, as before.
    let mut ringing = TestUa::udp(srv.sip_addr).await;
    let (provisional, ok) = ringing.call_with("0 101", "Supported: 100rel\r\n").await;
    assert_eq!(ok.code, 200);
    assert!(provisional.contains(&180), "{provisional:?}");
    ringing.bye().await;

    let mut other = TestUa::udp(srv.sip_addr).await;
    let (_, refused) = other
        .call_with("0 101", "Require: 100rel, precondition\r\n")
        .await;
    assert_eq!(refused.code, 420);
    assert_eq!(refused.header("Unsupported"), Some("precondition"));
    srv.shutdown().await;
}

/// A carrier SBC that requires session timers (RFC 4028) gets a call with one: the interval
/// and refresher in our 200, audio as usual, and its refresh answered with the interval.
#[tokio::test]
async fn a_trunk_that_requires_session_timers_gets_one() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let (_, ok) = ua
        .call_with(
            "0 101",
            "Supported: timer\r\nRequire: timer\r\nSession-Expires: 1800;refresher=uac\r\nMin-SE: 90\r\n",
        )
        .await;
    assert_eq!(ok.code, 200, "Require: timer used to get 420");
    assert_eq!(ok.header("Session-Expires"), Some("1800;refresher=uac"));
    assert_eq!(ok.header("Require"), Some("timer"));
    ua.until_packets(10).await;
    // The refresh: an UPDATE without a body, answered 200 with the interval.
    let update = ua.in_dialog(
        "UPDATE",
        "Supported: timer\r\nSession-Expires: 1800;refresher=uac\r\n",
        "",
    );
    ua.send_raw(&update).await;
    let r = ua.expect_response("UPDATE", 200, S).await;
    assert_eq!(r.header("Session-Expires"), Some("1800;refresher=uac"));
    // Too short an interval from a caller that supports timers: 422 with our Min-SE.
    let mut brief = TestUa::udp(srv.sip_addr).await;
    let (_, r) = brief
        .call_with("0 101", "Supported: timer\r\nSession-Expires: 30\r\n")
        .await;
    assert_eq!((r.code, r.header("Min-SE")), (422, Some("90")));
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn cancel_before_answer_gives_200_and_487() {
    let mut file = FileConfig::default();
    file.media.answer_after_ms = 3000;
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let sdp = ua.offer("0 101");
    let inv = ua.invite_bytes(&sdp);
    ua.send_raw(&inv).await;
    ua.expect_response("INVITE", 180, S).await;
    let cancel = format!(
        "CANCEL sip:311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch={br};rport\r\nMax-Forwards: 70\r\n\
From: \"Test Caller\" <sip:+15550001111@{me}>;tag={tag}\r\nTo: <sip:311@{srv}>\r\nCall-ID: {cid}\r\n\
CSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n",
        srv = srv.sip_addr,
        me = ua.local,
        br = ua.invite_branch,
        tag = ua.from_tag,
        cid = ua.call_id
    );
    ua.send_raw(cancel.as_bytes()).await;
    let mut got = vec![];
    while let Some(m) = ua.recv(Duration::from_millis(500)).await {
        if let Message::Response(r) = m {
            got.push((r.cseq_method.to_string(), r.code));
        }
    }
    assert!(got.contains(&("CANCEL".into(), 200)), "{got:?}");
    assert!(got.contains(&("INVITE".into(), 487)), "{got:?}");
    assert!(
        !got.iter().any(|(m, c)| m == "INVITE" && *c == 200),
        "never answered: {got:?}"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn server_hangs_up_a_call_with_no_media() {
    let mut file = FileConfig::default();
    file.limits.no_media_seconds = 1;
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    // Send nothing: within ~1 s the server sends BYE, which we answer.
    let bye = ua.expect_request("BYE", Duration::from_secs(4)).await;
    assert_eq!(bye.call_id, ua.call_id);
    assert_eq!(bye.to.tag(), Some(ua.from_tag.as_str()));
    until_no_calls(srv.http_addr).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_stray_stream_reaching_the_callers_port_first_does_not_take_the_callers_audio() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    let media = ua.remote_rtp.expect("answer names our media port");

    let stray = stray_stream(media).await;

    // The caller, sending from the address its SDP names, hears the menu from then on: the
    // stream, and the language menu in it.
    let ear = PromptEar::new("en", &["language_menu"], Codec::Pcmu);
    let heard = ua
        .listen_until("the language menu", Duration::from_secs(10), |h| {
            h.len() >= 60 && ear.frames_heard(h) >= 10
        })
        .await;
    assert_eq!(ear.playbacks(&heard), vec!["language_menu"]);
    // And the stray source no longer gets the call's audio.
    assert!(
        gets_nothing_more(&stray).await,
        "audio still goes to the stray source"
    );
    ua.bye().await;
    srv.shutdown().await;
}

/// A phone or gateway that offers no `telephone-event` sends its keys as tones in the audio.
/// The menu hears them there: 1 for English, 1 past the 911 screening, into the main menu.
/// (Before, such a caller's keys, the 911 key among them, were never heard.)
#[tokio::test]
async fn a_caller_without_rfc4733_is_heard_pressing_keys_as_tones() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let ok = ua.call("0").await;
    assert_eq!(ok.code, 200);
    let sdp = String::from_utf8_lossy(&ok.body).into_owned();
    assert!(!sdp.contains("telephone-event"), "{sdp}");
    let ear = PromptEar::new(
        "en",
        &["language_menu", "screening", "main_menu"],
        Codec::Pcmu,
    );
    let heard = ua.listen(Duration::from_millis(1000)).await;
    assert_eq!(ear.playbacks(&heard), ["language_menu"]);
    ua.press_tone('1').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear.playbacks(&heard), ["screening"]);
    ua.press_tone('1').await;
    let heard = ua.listen(Duration::from_millis(1200)).await;
    assert_eq!(ear.playbacks(&heard), ["main_menu"]);
    assert_eq!(ua.bye().await.code, 200);
    srv.shutdown().await;
}

/// A gateway without RFC 4733 that sends each key by SIP INFO and also leaves its tone in the
/// audio: each key counts once (a doubled 1 would skip the 911 screening), and after the first
/// INFO the keys come from INFO alone.
#[tokio::test]
async fn a_gateway_sending_info_and_tones_for_each_key_presses_it_once() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0").await.code, 200);
    let ear = PromptEar::new(
        "en",
        &["language_menu", "screening", "main_menu"],
        Codec::Pcmu,
    );
    ua.until_audio().await;
    for (playing, next) in [("language_menu", "screening"), ("screening", "main_menu")] {
        ua.press_tone('1').await;
        let info = ua.in_dialog(
            "INFO",
            "Content-Type: application/dtmf-relay\r\n",
            "Signal=1\r\nDuration=100\r\n",
        );
        ua.send_raw(&info).await;
        ua.expect_response("INFO", 200, S).await;
        let mut heard = ear.playbacks(&ua.listen(Duration::from_millis(1200)).await);
        // The prompt that played until the key took effect (the INFO, when the tone is
        // ignored) may still be heard first; it must not start again, nor be skipped.
        if heard.first().is_some_and(|p| p == playing) {
            heard.remove(0);
        }
        assert_eq!(heard, [next]);
    }
    ua.bye().await;
    // Counted when the call ends.
    assert_eq!(until_no_calls(srv.http_addr).await["digits_received"], 2);
    srv.shutdown().await;
}

#[tokio::test]
async fn options_ping_unknown_methods_and_unknown_dialogs() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let opt = format!(
        "OPTIONS sip:311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKopt1\r\nMax-Forwards: 70\r\n\
From: <sip:mon@{me}>;tag=m1\r\nTo: <sip:311@{srv}>\r\nCall-ID: opt1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        srv = srv.sip_addr,
        me = ua.local
    );
    ua.send_raw(opt.as_bytes()).await;
    let r = ua.expect_response("OPTIONS", 200, S).await;
    assert!(r.header("Allow").unwrap().contains("INVITE"));

    let unknown = opt
        .replace("OPTIONS sip", "FROBNICATE sip")
        .replace("1 OPTIONS", "1 FROBNICATE")
        .replace("opt1", "frob1");
    ua.send_raw(unknown.as_bytes()).await;
    ua.expect_response("FROBNICATE", 501, S).await;

    let sub = opt
        .replace("OPTIONS sip", "SUBSCRIBE sip")
        .replace("1 OPTIONS", "1 SUBSCRIBE")
        .replace("opt1", "sub1");
    ua.send_raw(sub.as_bytes()).await;
    let r = ua.expect_response("SUBSCRIBE", 405, S).await;
    assert!(r.header("Allow").is_some());

    ua.to_tag = Some("nosuchtag".into());
    let bye = ua.in_dialog("BYE", "", "");
    ua.send_raw(&bye).await;
    ua.expect_response("BYE", 481, S).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn malformed_request_gets_400_while_a_call_goes_on() {
    let srv = start_server(FileConfig::default()).await;
    let mut caller = TestUa::udp(srv.sip_addr).await;
    assert_eq!(caller.call("0 101").await.code, 200);
    let ear = PromptEar::new("en", &["language_menu", "screening"], Codec::Pcmu);

    let mut bad = TestUa::udp(srv.sip_addr).await;
    let garbage = format!(
        "INVITE sip:311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKbad\r\nMax-Forwards: 70\r\n\
From: <sip:x@{me}>;tag=1\r\nTo: <sip:311@{srv}>\r\nCall-ID: bad1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        srv = srv.sip_addr,
        me = bad.local
    );
    bad.send_raw(garbage.as_bytes()).await;
    let r = bad.expect_response("OPTIONS", 400, S).await;
    assert!(
        r.header("Warning").unwrap().contains("CSeq"),
        "400 says why"
    );
    // Raw junk and a huge datagram: no answer possible, no harm done.
    bad.send_raw(b"\x00\x01\x02 hello there\r\n\r\n").await;
    bad.send_raw(&vec![b'A'; 60000]).await;

    // The call in progress still hears keys.
    caller.until_audio().await;
    caller.press('1').await;
    let heard = caller.listen(Duration::from_millis(1000)).await;
    assert_eq!(ear.playbacks(&heard), vec!["screening"]);
    let h = health(srv.http_addr).await;
    assert!(h["sip_messages_malformed"].as_u64().unwrap() >= 2);
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn hold_and_unhold_by_reinvite_keep_the_call() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_packets(5).await;

    let hold = ua.offer("0 101").replace("a=sendrecv", "a=sendonly");
    let reinv = ua.in_dialog("INVITE", "Content-Type: application/sdp\r\n", &hold);
    ua.send_raw(&reinv).await;
    let r = ua.expect_response("INVITE", 200, S).await;
    assert!(String::from_utf8_lossy(&r.body).contains("a=recvonly"));
    ua.ack().await;
    // The prompt stops (what was on its way still arrives), and stays stopped: 400 ms is
    // twenty packets' time.
    ua.until_quiet(Duration::from_millis(100)).await;
    let held = ua.listen(Duration::from_millis(400)).await.len();
    assert_eq!(held, 0, "silent on hold, got {held} packets");

    let unhold = ua.offer("0 101");
    let reinv = ua.in_dialog("INVITE", "Content-Type: application/sdp\r\n", &unhold);
    ua.send_raw(&reinv).await;
    let r = ua.expect_response("INVITE", 200, S).await;
    assert!(String::from_utf8_lossy(&r.body).contains("a=sendrecv"));
    ua.ack().await;
    ua.until_packets(10).await; // audio is back
    assert_eq!(health(srv.http_addr).await["live_calls"], 1);
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_reinvite_without_sdp_gets_our_offer_and_the_acks_answer_moves_the_media() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_packets(5).await;

    // The caller's side re-INVITEs without SDP (a PBX after a transfer behind it): the 200
    // carries our offer, and the ACK answers with the media somewhere else.
    let moved = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let reinv = ua.in_dialog("INVITE", "", "");
    ua.send_raw(&reinv).await;
    let r = ua.expect_response("INVITE", 200, S).await;
    let ours = String::from_utf8_lossy(&r.body).to_string();
    assert!(ours.contains("m=audio"), "our offer in the 200: {ours}");
    let old_port = ua.rtp.local_addr().unwrap().port();
    let answer = ua.offer("0 101").replace(
        &format!("m=audio {old_port} "),
        &format!("m=audio {} ", moved.local_addr().unwrap().port()),
    );
    let ack = ua.in_dialog("ACK", "Content-Type: application/sdp\r\n", &answer);
    ua.send_raw(&ack).await;
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), moved.recv_from(&mut buf)).await
    {
        got += 1;
        if got == 20 {
            break;
        }
    }
    assert_eq!(
        got, 20,
        "prompts follow the ACK's answer to the new address"
    );
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn call_over_tcp() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::tcp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    // Spanish, over TCP.
    let ear = PromptEar::new("es", &["screening"], Codec::Pcmu);
    ua.until_audio().await;
    ua.press('2').await;
    let heard = ua.listen(Duration::from_millis(1000)).await;
    assert_eq!(ear.playbacks(&heard), vec!["screening"]);
    ua.bye().await;
    srv.shutdown().await;
}

/// A phone's TCP connection stays open for as long as its call lasts, however quiet SIP is
/// (a caller listening to prompts or waiting in a queue sends nothing on SIP for minutes):
/// the server's BYE at the end still reaches the phone. A connection with no call on it is
/// still closed after the idle time.
#[tokio::test]
async fn a_quiet_tcp_call_outlives_the_idle_timer_and_gets_our_bye() {
    let mut file = FileConfig::default();
    file.limits.tcp_idle_seconds = 1;
    // No 911 route: pressing 9 plays the announcement once, then the server hangs up.
    file.emergency.announce_repeats = 1;
    let srv = start_server(file).await;
    let mut ua = TestUa::tcp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("19").await;
    // Several idle periods pass with no SIP on the connection.
    let bye = ua.expect_request("BYE", Duration::from_secs(20)).await;
    assert_eq!(bye.method.as_str(), "BYE");

    // No call on it: an idle connection is closed by the server.
    let mut idle = tokio::net::TcpStream::connect(srv.sip_addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
    )
    .await
    .expect("closed after the idle time")
    .unwrap_or(0);
    assert_eq!(n, 0, "closed, nothing sent");
    srv.shutdown().await;
}

#[tokio::test]
async fn call_limit_gives_503_with_retry_after() {
    let mut file = FileConfig::default();
    file.limits.max_calls = 1;
    let srv = start_server(file).await;
    let mut a = TestUa::udp(srv.sip_addr).await;
    assert_eq!(a.call("0 101").await.code, 200);
    let mut b = TestUa::udp(srv.sip_addr).await;
    let r = b.call("0 101").await;
    assert_eq!(r.code, 503);
    assert!(r.header("Retry-After").is_some());
    // The first call still has audio.
    a.drain_rtp();
    a.until_packets(5).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_call_still_in_the_menu_after_the_drain_time_hears_goodbye_then_bye() {
    let mut file = FileConfig::default();
    file.limits.drain_seconds = 1;
    let srv = start_server(file).await;
    let http = srv.http_addr;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;

    // SIGTERM-style stop while the caller is in the language menu: new calls are refused at
    // once, this one keeps its menu for the drain time, then is told why it is hung up.
    let stop = tokio::spawn(srv.shutdown());
    until_draining(http).await;
    let mut late = TestUa::udp(ua.server).await;
    assert_eq!(
        late.call("0 101").await.code,
        503,
        "no new calls while draining"
    );
    assert_eq!(
        health(http).await["live_calls"],
        1,
        "the call in progress goes on"
    );

    let ear = PromptEar::new("en", &["language_menu", "shutdown_goodbye"], Codec::Pcmu);
    let heard = ua
        .listen_for("en", "shutdown_goodbye", Duration::from_secs(15))
        .await;
    let playbacks = ear.playbacks(&heard);
    assert_eq!(
        playbacks.last().map(String::as_str),
        Some("shutdown_goodbye"),
        "heard {playbacks:?}"
    );
    let bye = ua.expect_request("BYE", Duration::from_secs(6)).await;
    assert_eq!(bye.call_id, ua.call_id);
    stop.await.unwrap();
}
