//! Operators: agents register with digest auth, a caller presses 0, the agent's phone is
//! offered the call with the caller's context, answers, and media flows both ways.

mod common;

use common::*;
use ivr311::config::{AgentConfig, FileConfig, QueueConfig};
use ivr311::media::rtp;
use std::time::Duration;

fn config(agents: &[&str], ring_timeout: u64) -> FileConfig {
    FileConfig {
        agents: agents
            .iter()
            .map(|id| AgentConfig {
                id: (*id).into(),
                password: format!("pw{id}").into(),
                skills: vec![],
                tier: 1,
                name: None,
                role: Default::default(),
            })
            .collect(),
        queues: vec![QueueConfig {
            name: "general".into(),
            ring_timeout_seconds: ring_timeout,
            ..QueueConfig::default()
        }],
        ..FileConfig::default()
    }
}

/// An operator's SIP phone (shared with the other operator tests).
use common::TestAgent as Agent;

/// Caller: English, not an emergency, then 0 for an operator.
async fn caller_presses_zero(srv: &ivr311::server::RunningServer) -> TestUa {
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;
    ua
}

/// Caller presses 0 and operator 1001 answers at once: the call is bridged.
async fn bridged_to_1001(
    srv: &ivr311::server::RunningServer,
) -> (Agent, TestUa, ivr311::sip::message::Request) {
    let agent = Agent::login(srv.sip_addr, "1001").await;
    let ua = caller_presses_zero(srv).await;
    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    agent.reply(&inv, 200, "OK", Some(agent.answer_sdp())).await;
    agent.request("ACK", Duration::from_secs(3)).await;
    (agent, ua, inv)
}

#[tokio::test]
async fn caller_is_bridged_to_a_registered_agent_with_context_and_media_both_ways() {
    let srv = start_server(config(&["1001"], 20)).await;
    let agent = Agent::login(srv.sip_addr, "1001").await;
    let mut ua = caller_presses_zero(&srv).await;

    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(inv.from.user(), Some("+15550001111"), "the caller's number");
    assert!(inv
        .header("P-Asserted-Identity")
        .unwrap()
        .contains("+15550001111"));
    assert_eq!(inv.header("X-311-Language"), Some("en"));
    assert_eq!(inv.header("X-311-Queue"), Some("general"));
    assert!(
        inv.header("X-311-Menu-Path").unwrap().contains("main:0"),
        "{:?}",
        inv.header("X-311-Menu-Path")
    );
    assert!(inv.header("X-311-Waited").unwrap().parse::<u64>().is_ok());
    let offer = ivr311::media::sdp::parse(&inv.body).unwrap();
    agent.reply(&inv, 180, "Ringing", None).await;
    // While it rings the phone sends early media (a ringback tone, 30 packets).
    let mut early = rtp::RtpStream::new();
    let mut out = [0u8; 200];
    for _ in 0..30 {
        let n = early.write(0, &[0x11; 160], 160, &mut out);
        agent.rtp.send_to(&out[..n], offer.addr).await.unwrap();
    }
    // Not a wait: the phone answers a moment after its early media, as phones do.
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent.reply(&inv, 200, "OK", Some(agent.answer_sdp())).await;
    assert_eq!(
        agent
            .request("ACK", Duration::from_secs(3))
            .await
            .method
            .as_str(),
        "ACK"
    );

    // Caller -> agent.
    let speaking = tokio::spawn(async move {
        ua.speak(25).await;
        ua
    });
    let mut got = 0;
    let mut buf = [0u8; 2048];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(700), agent.rtp.recv_from(&mut buf)).await
    {
        if rtp::parse(&buf[..n]).is_ok_and(|p| p.payload_type == 0) {
            got += 1;
        }
    }
    let mut ua = speaking.await.unwrap();
    assert!(got >= 15, "caller audio reached the agent: {got}");
    // Agent -> caller.
    let mut s = rtp::RtpStream::new();
    for _ in 0..20 {
        let n = s.write(0, &[0x55; 160], 160, &mut out);
        agent.rtp.send_to(&out[..n], offer.addr).await.unwrap();
        // Paced as a phone sends, one packet each 20 ms: not a wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heard = ua.listen(Duration::from_millis(300)).await;
    assert!(
        heard.iter().filter(|p| p[0] == 0x55).count() >= 10,
        "agent audio reached the caller"
    );
    // What the phone sent before it answered never reaches the caller (relayed, it would
    // arrive as one burst of stale audio ahead of the agent's voice).
    let stale = heard
        .iter()
        .filter(|p| p.iter().all(|&b| b == 0x11))
        .count();
    assert_eq!(stale, 0, "early media relayed after the answer");

    let (_, agents) = http(srv.http_addr, "GET", "/admin/agents", &[], b"").await;
    assert!(
        agents.contains("on_call") || agents.contains("OnCall") || agents.contains("on call"),
        "{agents}"
    );

    // The agent hangs up: the caller gets BYE.
    let bye = format!(
        "BYE sip:ivr311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKagbye\r\nMax-Forwards: 70\r\nFrom: {to};tag=ag1001\r\nTo: {fr}\r\nCall-ID: {cid}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        srv = srv.sip_addr,
        me = agent.sip.local_addr().unwrap(),
        to = inv.to.raw,
        fr = inv.from.raw,
        cid = inv.call_id
    );
    agent
        .sip
        .send_to(bye.as_bytes(), srv.sip_addr)
        .await
        .unwrap();
    ua.expect_request("BYE", Duration::from_secs(5)).await;
    let q = until(
        "the call counted as answered",
        Duration::from_secs(10),
        async || {
            let (_, q) = http(srv.http_addr, "GET", "/admin/queues", &[], b"").await;
            let q: serde_json::Value = serde_json::from_str(&q).unwrap();
            (q[0]["answered"] == 1).then_some(q)
        },
    )
    .await;
    assert_eq!(q[0]["waiting"], 0, "{q}");
    srv.shutdown().await;
}

#[tokio::test]
async fn caller_hanging_up_while_the_agent_rings_cancels_the_offer() {
    let srv = start_server(config(&["1001"], 20)).await;
    let agent = Agent::login(srv.sip_addr, "1001").await;
    let mut ua = caller_presses_zero(&srv).await;
    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    agent.reply(&inv, 180, "Ringing", None).await;
    ua.bye().await;
    let cancel = agent.request("CANCEL", Duration::from_secs(5)).await;
    assert_eq!(cancel.call_id, inv.call_id);
    srv.shutdown().await;
}

#[tokio::test]
async fn with_no_agent_logged_in_the_caller_is_told_at_once() {
    let srv = start_server(config(&["1001"], 20)).await;
    let mut ua = caller_presses_zero(&srv).await;
    let heard = ua.listen(Duration::from_millis(2500)).await;
    let ear = PromptEar::new(
        "en",
        &["operator_unavailable", "hold_music"],
        ivr311::media::g711::Codec::Pcmu,
    );
    assert_eq!(
        ear.playbacks(&heard).first().map(String::as_str),
        Some("operator_unavailable")
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn an_operator_phone_that_goes_silent_is_asked_then_hung_up_and_the_caller_offered_a_ticket()
{
    let mut file = config(&["1001"], 20);
    file.limits.operator_silence_seconds = 2;
    let srv = start_server(file).await;
    let (agent, mut ua, inv) = bridged_to_1001(&srv).await;

    // The operator's phone sends nothing (silence suppression while the operator listens).
    // After `operator_silence_seconds` the server asks it with an in-dialog OPTIONS; it answers, so
    // the bridge stays.
    let (_, first) = tokio::join!(ua.listen(Duration::from_millis(4000)), async {
        let options = agent.request("OPTIONS", Duration::from_secs(4)).await;
        agent.reply(&options, 200, "OK", None).await;
        options
    });
    assert_eq!(first.call_id, inv.call_id, "asked inside the dialog");

    // Then the phone restarts: no BYE, no audio, and the next OPTIONS gets 481. The server
    // gives up on the phone, not on the caller (whose phone keeps sending).
    let (heard, bye) = tokio::join!(ua.listen(Duration::from_millis(7000)), async {
        let options = loop {
            let o = agent.request("OPTIONS", Duration::from_secs(4)).await;
            if o.header("CSeq") != first.header("CSeq") {
                break o;
            }
        };
        agent
            .reply(&options, 481, "Call/Transaction Does Not Exist", None)
            .await;
        agent.request("BYE", Duration::from_secs(3)).await
    });
    assert_eq!(bye.call_id, inv.call_id, "the operator's leg is hung up");
    let ear = PromptEar::new(
        "en",
        &["operator_unavailable", "offer_general_ticket"],
        ivr311::media::g711::Codec::Pcmu,
    );
    assert_eq!(
        ear.playbacks(&heard).first().map(String::as_str),
        Some("operator_unavailable"),
        "the caller is offered a ticket"
    );
    // The caller's call is still up, and the operator is free again.
    let (_, calls) = http(srv.http_addr, "GET", "/admin/calls", &[], b"").await;
    let calls: serde_json::Value = serde_json::from_str(&calls).unwrap();
    assert_eq!(calls.as_array().map(Vec::len), Some(1), "{calls}");
    let (_, agents) = http(srv.http_addr, "GET", "/admin/agents", &[], b"").await;
    assert!(!agents.contains("on_call"), "{agents}");
    srv.shutdown().await;
}

#[tokio::test]
async fn an_operator_behind_nat_hears_the_caller_at_the_address_its_audio_comes_from() {
    let srv = start_server(config(&["1001"], 20)).await;
    let agent = Agent::login(srv.sip_addr, "1001").await;
    let mut ua = caller_presses_zero(&srv).await;
    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    let offer = ivr311::media::sdp::parse(&inv.body).unwrap();
    // An operator working from home: the phone's SDP names its address on the home network,
    // which the server cannot reach (here a socket that stands for it); its audio comes from
    // the NAT's public address (here the phone's real socket).
    let private = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let public_port = agent.rtp.local_addr().unwrap().port();
    let sdp = agent.answer_sdp().replace(
        &format!("m=audio {public_port} "),
        &format!("m=audio {} ", private.local_addr().unwrap().port()),
    );
    agent.reply(&inv, 200, "OK", Some(sdp)).await;
    agent.request("ACK", Duration::from_secs(3)).await;
    // The operator says hello; the caller hears it.
    let mut s = rtp::RtpStream::new();
    let mut out = [0u8; 200];
    for _ in 0..10 {
        let n = s.write(0, &[0x55; 160], 160, &mut out);
        agent.rtp.send_to(&out[..n], offer.addr).await.unwrap();
        // Paced as a phone sends, one packet each 20 ms: not a wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heard = ua.listen(Duration::from_millis(300)).await;
    assert!(heard.iter().filter(|p| p[0] == 0x55).count() >= 5);
    // The caller answers: their audio goes where the operator's came from.
    let speaking = tokio::spawn(async move { ua.speak(25).await });
    let (mut got, mut lost) = (0, 0);
    let (mut buf, mut elsewhere) = ([0u8; 2048], [0u8; 2048]);
    loop {
        tokio::select! {
            r = agent.rtp.recv_from(&mut buf) => {
                let (n, _) = r.unwrap();
                if rtp::parse(&buf[..n]).is_ok_and(|p| p.payload_type == 0) {
                    got += 1;
                }
            }
            r = private.recv_from(&mut elsewhere) => {
                r.unwrap();
                lost += 1;
            }
            // The end of the window: nothing more came for 700 ms.
            _ = tokio::time::sleep(Duration::from_millis(700)) => break,
        }
    }
    speaking.await.unwrap();
    assert!(got >= 15, "the caller reached the operator's phone: {got}");
    assert_eq!(
        lost, 0,
        "sent to the SDP address after the phone's audio came from elsewhere"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn an_operator_phone_reinviting_without_sdp_gets_our_offer_and_its_acks_answer_counts() {
    let srv = start_server(config(&["1001"], 20)).await;
    let (agent, mut ua, inv) = bridged_to_1001(&srv).await;
    // Some phones and PBXs re-INVITE without SDP (to hold, after a transfer behind them): the
    // 200 carries our offer and the ACK the answer. Here the answer holds the call.
    let reinvite = from_agent(&srv, &agent.sip, &inv, "INVITE", 2, None);
    agent
        .sip
        .send_to(reinvite.as_bytes(), srv.sip_addr)
        .await
        .unwrap();
    let r = final_response(&agent.sip, 2).await;
    assert_eq!(r.code, 200);
    let ours = ivr311::media::sdp::parse(&r.body).expect("our offer in the 200");
    assert_eq!(ours.addr.ip(), srv.sip_addr.ip());
    let hold = agent
        .answer_sdp()
        .replace("a=rtpmap:0", "a=sendonly\r\na=rtpmap:0");
    let ack = from_agent(&srv, &agent.sip, &inv, "ACK", 2, Some(&hold));
    agent
        .sip
        .send_to(ack.as_bytes(), srv.sip_addr)
        .await
        .unwrap();
    let heard = ua.listen(Duration::from_millis(1500)).await;
    let ear = PromptEar::new("en", &["hold_music"], ivr311::media::g711::Codec::Pcmu);
    assert_eq!(
        ear.playbacks(&heard),
        vec!["hold_music".to_string()],
        "the caller hears hold music while the phone holds"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn an_operator_phone_refreshing_or_holding_the_session_is_answered() {
    let srv = start_server(config(&["1001"], 20)).await;
    let (agent, mut ua, inv) = bridged_to_1001(&srv).await;

    // A session refresh (RFC 4028 by UPDATE, no body): 200 with no offer in it (RFC 3311).
    let r = agent_request(&srv, &agent.sip, &inv, "UPDATE", 2, None).await;
    assert_eq!(r.code, 200);
    assert!(r.body.is_empty(), "no offer in a 2xx to UPDATE");

    // The operator puts the caller on hold (re-INVITE, sendonly): 200 with recvonly. The
    // phone sends nothing while it holds; the caller hears our hold music, and none of the
    // caller's audio goes to the phone.
    let hold = agent
        .answer_sdp()
        .replace("a=rtpmap:0", "a=sendonly\r\na=rtpmap:0");
    let r = agent_request(&srv, &agent.sip, &inv, "INVITE", 3, Some(&hold)).await;
    assert_eq!(r.code, 200);
    let answer = String::from_utf8_lossy(&r.body).to_string();
    assert!(answer.contains("a=recvonly"), "{answer}");
    let heard = ua.listen(Duration::from_millis(1500)).await;
    let ear = PromptEar::new("en", &["hold_music"], ivr311::media::g711::Codec::Pcmu);
    assert_eq!(ear.playbacks(&heard), vec!["hold_music".to_string()]);
    let mut buf = [0u8; 2048];
    let mut to_phone = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(100), agent.rtp.recv_from(&mut buf)).await
    {
        to_phone += 1;
    }
    assert!(
        to_phone <= 5,
        "caller audio sent to a phone that holds: {to_phone}"
    );

    // Off hold (sendrecv again): the caller's audio reaches the operator's phone.
    let r = agent_request(
        &srv,
        &agent.sip,
        &inv,
        "INVITE",
        4,
        Some(&agent.answer_sdp()),
    )
    .await;
    assert_eq!(r.code, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("a=sendrecv"));
    let speaking = tokio::spawn(async move {
        ua.speak(15).await;
        ua
    });
    let mut got = 0;
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), agent.rtp.recv_from(&mut buf)).await
    {
        if rtp::parse(&buf[..n]).is_ok_and(|p| p.payload_type == 0) {
            got += 1;
        }
    }
    let _ua = speaking.await.unwrap();
    assert!(got >= 10, "caller audio after the hold: {got}");
    srv.shutdown().await;
}

#[tokio::test]
async fn a_caller_who_holds_the_bridge_is_sent_nothing_until_they_resume() {
    let srv = start_server(config(&["1001"], 20)).await;
    let (agent, mut ua, inv) = bridged_to_1001(&srv).await;
    let offer = ivr311::media::sdp::parse(&inv.body).unwrap();
    ua.listen(Duration::from_millis(100)).await;
    let talk = |n: usize| {
        let agent = &agent;
        async move {
            let mut s = rtp::RtpStream::new();
            let mut out = [0u8; 200];
            for _ in 0..n {
                let len = s.write(0, &[0x55; 160], 160, &mut out);
                agent.rtp.send_to(&out[..len], offer.addr).await.unwrap();
                // Paced as a phone sends: not a wait.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // The caller's phone holds the call (sendonly): the operator's audio is not sent to it.
    let hold = ua.offer("0 101").replace("a=sendrecv", "a=sendonly");
    let reinv = ua.in_dialog("INVITE", "Content-Type: application/sdp\r\n", &hold);
    ua.send_raw(&reinv).await;
    let r = ua
        .expect_response("INVITE", 200, Duration::from_secs(5))
        .await;
    assert!(String::from_utf8_lossy(&r.body).contains("a=recvonly"));
    ua.ack().await;
    let (heard, ()) = tokio::join!(ua.listen(Duration::from_millis(500)), talk(20));
    let relayed = heard.iter().filter(|p| p[0] == 0x55).count();
    assert!(
        relayed <= 1,
        "operator audio sent to a held caller: {relayed}"
    );

    // Off hold: it is relayed again.
    let unhold = ua.offer("0 101");
    let reinv = ua.in_dialog("INVITE", "Content-Type: application/sdp\r\n", &unhold);
    ua.send_raw(&reinv).await;
    ua.expect_response("INVITE", 200, Duration::from_secs(5))
        .await;
    ua.ack().await;
    let (heard, ()) = tokio::join!(ua.listen(Duration::from_millis(500)), talk(20));
    let relayed = heard.iter().filter(|p| p[0] == 0x55).count();
    assert!(
        relayed >= 15,
        "operator audio after the caller resumed: {relayed}"
    );
    srv.shutdown().await;
}

/// The place in the queue and the estimated wait are read as numbers in the caller's language
/// ("about eleven minutes", "unos veintiún minutos"), not digit by digit ("one one").
///
/// One call answered and ended makes the queue's handle time about 610 s (a 610 s wrap-up plus
/// the talk); with the only operator in wrap-up, the next caller (English) waits one handle
/// time, 11 minutes, and the one after (Spanish) two, 21 minutes.
#[tokio::test]
async fn queue_place_and_wait_are_read_as_numbers_in_english_and_spanish() {
    let mut file = config(&["1001"], 20);
    file.queues[0].wrap_up_seconds = 610;
    let srv = start_server(file).await;
    let (agent, mut first, _) = bridged_to_1001(&srv).await;
    first.listen(Duration::from_millis(300)).await;
    first.bye().await;
    agent.request("BYE", Duration::from_secs(5)).await;
    let mut waiting = Vec::new();

    for (language_key, lang, place, minutes) in [
        ('1', "en", None, "num_11"),
        ('2', "es", Some("num_2"), "num_21_m"),
    ] {
        let mut ua = TestUa::udp(srv.sip_addr).await;
        assert_eq!(ua.call("0 101").await.code, 200);
        ua.until_audio().await;
        ua.keys(&format!("{language_key}10")).await;
        let heard = ua
            .listen_for(lang, "queue_options", Duration::from_secs(30))
            .await;
        // Words also said as single digits ("one", "dos") sound the same either way and are
        // left out; what tells numbers from digits is the minutes.
        let mut names = vec!["queue_position", "queue_wait", minutes, "minutes"];
        names.extend(place);
        let ear = PromptEar::new(lang, &names, ivr311::media::g711::Codec::Pcmu);
        let mut want = vec!["queue_position"];
        want.extend(place);
        want.extend(["queue_wait", minutes, "minutes"]);
        assert_eq!(prompts_heard(&ear, &heard), want, "{lang}");
        // Still waiting: the next caller is behind this one.
        waiting.push(ua);
    }
    srv.shutdown().await;
}
