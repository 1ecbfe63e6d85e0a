//! Hung peers: a caller that never ACKs, a caller that never answers our BYE, an agent phone
//! that vanishes while it rings. Every RFC 3261 timer involved fires and every resource (the
//! call, its RTP port, the dialog, the transactions, the agent) is released.
//!
//! The transaction timers are 64·T1 = 32 s with T1 fixed at 500 ms (no knob), and the server
//! runs real sockets, so these tests wait real time: about 35 s each, run in parallel.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::sip::message::Message;
use std::time::Duration;

/// 64·T1 plus a margin for a loaded machine.
const TIMER_64T1: Duration = Duration::from_secs(40);
/// A call's RTP port is back in the pool one media-clock tick (20 ms) after the call ends; the
/// rest is slack for a loaded machine.
const PORT_BACK: Duration = Duration::from_secs(2);

#[tokio::test]
async fn a_caller_that_never_acks_is_torn_down_after_64_t1_and_everything_is_released() {
    let srv = start_server(FileConfig::default()).await;
    let ports_idle = metric(srv.http_addr, "ivr311_rtp_ports_free").await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let offer = ua.offer("0 101");
    let invite = ua.invite_bytes(&offer);
    ua.send_raw(&invite).await;
    // The 200 comes, and comes again (timer G), because we never ACK it.
    let mut oks = 0;
    while oks < 3 {
        match ua.recv(Duration::from_secs(5)).await {
            Some(Message::Response(r)) if r.code == 200 => oks += 1,
            Some(_) => {}
            None => panic!("the 200 was not retransmitted while unacknowledged"),
        }
    }
    assert_eq!(admin_calls(srv.http_addr).await.len(), 1, "the call is up");
    assert_eq!(
        metric(srv.http_addr, "ivr311_rtp_ports_free").await,
        ports_idle - 1.0
    );

    // 64·T1 after the 200 (timer L of RFC 6026, which took over timer H's job for a 2xx), the
    // server gives up on the ACK and ends the call.
    let live = settle_metric(srv.http_addr, "ivr311_live_calls", 0.0, TIMER_64T1).await;
    assert_eq!(live, 0.0, "the unacknowledged call is torn down");
    assert!(
        admin_calls(srv.http_addr).await.is_empty(),
        "admin view empty"
    );
    assert_port_back(srv.http_addr, ports_idle).await;
    assert_eq!(
        metric(srv.http_addr, "ivr311_sip_dialogs").await,
        0.0,
        "dialog released"
    );
    let txns = settle_metric(
        srv.http_addr,
        "ivr311_sip_transactions",
        0.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(txns, 0.0, "transactions released");
    // The retransmissions stopped.
    while ua.recv(Duration::from_millis(100)).await.is_some() {}
    while let Some(m) = ua.recv(Duration::from_secs(3)).await {
        if let Message::Response(r) = m {
            panic!("{} {} still sent for the dead call", r.code, r.cseq_method);
        }
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn a_caller_that_never_answers_our_bye_is_released_by_timer_f() {
    let srv = start_server(FileConfig::default()).await;
    let ports_idle = metric(srv.http_addr, "ivr311_rtp_ports_free").await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    assert_eq!(admin_calls(srv.http_addr).await.len(), 1);

    // The admin ends the call: the server sends BYE, which we never answer.
    let (status, _) = http(
        srv.http_addr,
        "POST",
        &format!("/admin/calls/{}/hangup", ua.call_id),
        &[("Content-Type", "application/json")],
        b"",
    )
    .await;
    assert_eq!(status, 204);
    let mut byes = 0;
    while byes < 3 {
        match ua.recv(Duration::from_secs(5)).await {
            Some(Message::Request(r)) if r.method.as_str() == "BYE" => byes += 1,
            Some(_) => {}
            None => panic!("the BYE was not retransmitted (timer E) while unanswered"),
        }
    }
    // The call itself is gone at once: no port is held while the BYE is retried.
    let live = settle_metric(
        srv.http_addr,
        "ivr311_live_calls",
        0.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(live, 0.0);
    assert!(admin_calls(srv.http_addr).await.is_empty());
    assert_port_back(srv.http_addr, ports_idle).await;
    // Timer F (64·T1): the BYE transaction gives up and the dialog goes.
    let txns = settle_metric(srv.http_addr, "ivr311_sip_transactions", 0.0, TIMER_64T1).await;
    assert_eq!(txns, 0.0, "the BYE client transaction timed out");
    assert_eq!(metric(srv.http_addr, "ivr311_sip_dialogs").await, 0.0);
    srv.shutdown().await;
}

#[tokio::test]
async fn an_agent_phone_that_vanishes_mid_ring_is_skipped_and_not_left_ringing() {
    let srv = start_server(agents_config(&["1001", "1002"], 2, 2)).await;
    let a1 = TestAgent::login(srv.sip_addr, "1001").await;
    let a2 = TestAgent::login(srv.sip_addr, "1002").await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;

    // 1001 (idle longest) is offered the call, and its phone is gone: not even 100 Trying.
    let inv1 = a1.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(agent_state(srv.http_addr, "1001").await, "ringing");
    // After the 2 s ring timeout the next agent rings.
    let inv2 = a2.request("INVITE", Duration::from_secs(10)).await;
    assert_eq!(inv2.from.user(), Some("+15550001111"));
    assert_ne!(inv1.call_id, inv2.call_id);
    assert_ne!(agent_state(srv.http_addr, "1001").await, "ringing");
    a2.reply(&inv2, 180, "Ringing", None).await;
    a2.reply(&inv2, 200, "OK", Some(a2.answer_sdp())).await;
    a2.request("ACK", Duration::from_secs(3)).await;
    // The caller talks to 1002, then hangs up.
    ua.send_audio(10).await;
    ua.bye().await;
    let bye = a2.request("BYE", Duration::from_secs(5)).await;
    a2.reply(&bye, 200, "OK", None).await;

    // Timer B (64·T1) ends the INVITE that 1001 never answered: nothing is left behind, and
    // 1001 is not stuck ringing (available again after its no-answer pause).
    let txns = settle_metric(srv.http_addr, "ivr311_sip_transactions", 0.0, TIMER_64T1).await;
    assert_eq!(
        txns, 0.0,
        "the vanished agent's INVITE transaction is released"
    );
    let m = metrics(srv.http_addr).await;
    assert_eq!(m["ivr311_sip_dialogs"], 0.0);
    assert_eq!(m["ivr311_live_calls"], 0.0);
    assert_eq!(agent_state(srv.http_addr, "1001").await, "available");
    srv.shutdown().await;
}

/// The call's RTP port goes back to the pool when the media clock lets go of the call (when
/// its phase's turn next comes, within one packet time), so wait up to [`PORT_BACK`] for it.
async fn assert_port_back(http: std::net::SocketAddr, ports_idle: f64) {
    let ports = settle_metric(http, "ivr311_rtp_ports_free", ports_idle, PORT_BACK).await;
    assert_eq!(ports, ports_idle, "RTP port released");
}
