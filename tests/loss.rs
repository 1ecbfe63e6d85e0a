//! Loss, duplication and reordering between a caller and the server.
//!
//! Each caller talks to the server through two small loopback relays of its own (one for SIP,
//! one for RTP: the caller's SDP offer names the RTP relay), which drop, duplicate and reorder
//! packets in both directions with a seeded random generator. The caller retransmits its
//! INVITE and BYE as RFC 3261 says (timers A and E) and ACKs every 200 it receives; the
//! server's own retransmissions (200 until ACK, timer G) do the rest.
//!
//! Shown: every call completes through the menu and files its ticket, each key is acted on
//! once (the caller hears the right next prompt, never the one after it, and the ZIP code
//! is stored exactly as keyed), and afterwards the server holds no call, dialog or
//! transaction and every RTP port is back in the pool.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::media::g711::Codec;
use ivr311::media::sdp;
use ivr311::sip::message::{Message, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;

/// Calls placed, all at once, each through its own relays.
const CALLS: u64 = 16;
/// Share of SIP packets dropped, in each direction.
const SIP_DROP: f64 = 0.20;
/// Share of RTP packets dropped, in each direction.
const RTP_DROP: f64 = 0.15;
/// Share of packets sent twice.
const DUPLICATE: f64 = 0.05;
/// Share of packets held back and sent after the next one (or after 40 ms).
const REORDER: f64 = 0.05;
/// RFC 3261 T1 and T2, for the caller's own retransmissions.
const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
/// 64·T1 plus a margin: how long the server's transactions may outlive the calls.
const TXN_LINGER: Duration = Duration::from_secs(45);

#[derive(Default)]
struct RelayStats {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

/// A UDP relay between a near peer (the caller) and a far peer (the server) that impairs
/// traffic both ways. A peer not given is learned from the first packet of a new source.
struct Relay {
    addr: SocketAddr,
    far: Arc<Mutex<Option<SocketAddr>>>,
    stats: Arc<RelayStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn start(
        near: Option<SocketAddr>,
        far: Option<SocketAddr>,
        drop_share: f64,
        seed: u64,
    ) -> Relay {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let near = Arc::new(Mutex::new(near));
        let far = Arc::new(Mutex::new(far));
        let stats = Arc::new(RelayStats::default());
        let task = tokio::spawn(relay(
            sock,
            near,
            far.clone(),
            stats.clone(),
            drop_share,
            seed,
        ));
        Relay {
            addr,
            far,
            stats,
            task,
        }
    }

    fn set_far(&self, far: SocketAddr) {
        *self.far.lock().unwrap() = Some(far);
    }
}

async fn relay(
    sock: UdpSocket,
    near: Arc<Mutex<Option<SocketAddr>>>,
    far: Arc<Mutex<Option<SocketAddr>>>,
    stats: Arc<RelayStats>,
    drop_share: f64,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 65535];
    let mut held: Option<(Vec<u8>, SocketAddr, tokio::time::Instant)> = None;
    loop {
        let flush_at = held.as_ref().map(|h| h.2);
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, src)) = r else { return };
                let dst = {
                    let mut near = near.lock().unwrap();
                    let mut far = far.lock().unwrap();
                    if Some(src) == *near {
                        *far
                    } else if Some(src) == *far {
                        *near
                    } else if near.is_none() {
                        *near = Some(src);
                        *far
                    } else if far.is_none() {
                        *far = Some(src);
                        *near
                    } else {
                        None
                    }
                };
                let Some(dst) = dst else { continue };
                let x: f64 = rng.random();
                if x < drop_share {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let pkt = buf[..n].to_vec();
                if x < drop_share + REORDER && held.is_none() {
                    stats.reordered.fetch_add(1, Ordering::Relaxed);
                    held = Some((pkt, dst, tokio::time::Instant::now() + Duration::from_millis(40)));
                    continue;
                }
                let _ = sock.send_to(&pkt, dst).await;
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
                if x >= drop_share + REORDER && x < drop_share + REORDER + DUPLICATE {
                    stats.duplicated.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.send_to(&pkt, dst).await;
                }
                if let Some((p, d, _)) = held.take() {
                    let _ = sock.send_to(&p, d).await;
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {
                if let Some((p, d, _)) = held.take() {
                    let _ = sock.send_to(&p, d).await;
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Answer what the server sent meanwhile: ACK every 200 to the INVITE again (ours may have
/// been lost), 200 any request.
async fn pump(ua: &mut TestUa) {
    while let Some(m) = ua.recv(Duration::from_millis(5)).await {
        match m {
            Message::Response(r) if r.cseq_method.as_str() == "INVITE" && r.code == 200 => {
                ua.ack().await
            }
            Message::Request(req) => ua.answer_request(&req).await,
            Message::Response(_) => {}
        }
    }
}

/// Send `bytes` (a request with CSeq method `method`) and retransmit it on timers A/E until a
/// final response arrives; other traffic is answered on the way.
async fn transact(ua: &mut TestUa, bytes: &[u8], method: &str) -> Result<Response, String> {
    ua.send_raw(bytes).await;
    let give_up = std::time::Instant::now() + 64 * T1;
    let mut interval = T1;
    let mut proceeding = false;
    loop {
        if std::time::Instant::now() >= give_up {
            return Err(format!("no final response to {method} within 64·T1"));
        }
        match ua.recv(interval).await {
            Some(Message::Response(r)) if r.cseq_method.as_str() == method => {
                if r.code >= 200 {
                    return Ok(r);
                }
                // An INVITE is not retransmitted once a provisional response has come.
                proceeding = method == "INVITE";
            }
            Some(Message::Response(r)) if r.cseq_method.as_str() == "INVITE" && r.code == 200 => {
                ua.ack().await
            }
            Some(Message::Request(req)) => ua.answer_request(&req).await,
            Some(Message::Response(_)) => {}
            None => {
                if !proceeding {
                    ua.send_raw(bytes).await;
                }
                interval = (interval * 2).min(T2);
            }
        }
    }
}

/// What one caller got.
#[derive(Debug)]
struct Outcome {
    call_id: String,
    /// The ticket number was read back.
    told_number: bool,
    sip: (u64, u64, u64, u64),
    rtp: (u64, u64, u64, u64),
}

fn figures(s: &RelayStats) -> (u64, u64, u64, u64) {
    (
        s.forwarded.load(Ordering::Relaxed),
        s.dropped.load(Ordering::Relaxed),
        s.duplicated.load(Ordering::Relaxed),
        s.reordered.load(Ordering::Relaxed),
    )
}

/// One caller through impaired relays: the menu to the pothole ZIP code, the ticket filed.
async fn lossy_call(server: SocketAddr, seed: u64, ear: Arc<PromptEar>) -> Result<Outcome, String> {
    let sip = Relay::start(None, Some(server), SIP_DROP, seed).await;
    let mut ua = TestUa::udp(sip.addr).await;
    let rtp = Relay::start(
        Some(ua.rtp.local_addr().unwrap()),
        None,
        RTP_DROP,
        seed + 1000,
    )
    .await;
    let own_port = ua.rtp.local_addr().unwrap().port();
    let offer = ua.offer("0 101").replace(
        &format!("m=audio {own_port} "),
        &format!("m=audio {} ", rtp.addr.port()),
    );
    let invite = ua.invite_bytes(&offer);
    let ok = transact(&mut ua, &invite, "INVITE").await?;
    if ok.code != 200 {
        return Err(format!("INVITE got {}", ok.code));
    }
    ua.to_tag = ok.to.tag().map(str::to_owned);
    let answer = sdp::parse(&ok.body).map_err(|e| format!("answer SDP: {e}"))?;
    rtp.set_far(answer.addr);
    ua.remote_rtp = Some(rtp.addr);
    ua.codec = Codec::Pcmu;
    ua.ack().await;

    let heard = ua.listen(Duration::from_millis(1200)).await;
    let got = prompts_heard(&ear, &heard);
    if !got.contains(&"language_menu".to_owned()) {
        return Err(format!("no greeting: {got:?}"));
    }
    // Each key must take the caller exactly one step: the next prompt, never the one after.
    for (expect, not) in [
        ("screening", "main_menu"),
        ("main_menu", "streets_menu"),
        ("streets_menu", "enter_zip"),
        ("enter_zip", "invalid_zip"),
    ] {
        ua.press('1').await;
        let heard = ua.listen(Duration::from_millis(1500)).await;
        pump(&mut ua).await;
        let got = prompts_heard(&ear, &heard);
        if !got.contains(&expect.to_owned()) || got.contains(&not.to_owned()) {
            return Err(format!("after 1 expected {expect}, heard {got:?}"));
        }
    }
    ua.keys("94103").await;
    // The ZIP read back ("You entered 9 4 1 0 3"), then the recording prompt.
    let heard = ua.listen(Duration::from_millis(5500)).await;
    pump(&mut ua).await;
    let got = prompts_heard(&ear, &heard);
    if !got.contains(&"record_description".to_owned()) {
        return Err(format!("after the ZIP code heard {got:?}"));
    }
    ua.press('#').await; // no description: file at once
    let heard = ua.listen(Duration::from_millis(4000)).await;
    pump(&mut ua).await;
    let told_number = prompts_heard(&ear, &heard).contains(&"ticket_filed".to_owned());

    let bye = ua.in_dialog("BYE", "", "");
    let r = transact(&mut ua, &bye, "BYE").await?;
    if r.code != 200 {
        return Err(format!("BYE got {}", r.code));
    }
    Ok(Outcome {
        call_id: ua.call_id.clone(),
        told_number,
        sip: figures(&sip.stats),
        rtp: figures(&rtp.stats),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_complete_through_loss_duplication_and_reordering_and_leave_nothing_behind() {
    let srv = start_server(FileConfig::default()).await;
    let ports_idle = metric(srv.http_addr, "ivr311_rtp_ports_free").await;
    let ear = Arc::new(PromptEar::new(
        "en",
        &[
            "language_menu",
            "screening",
            "main_menu",
            "streets_menu",
            "enter_zip",
            "invalid_zip",
            "record_description",
            "ticket_filed",
        ],
        Codec::Pcmu,
    ));
    let mut set = tokio::task::JoinSet::new();
    for seed in 1..=CALLS {
        let ear = ear.clone();
        let server = srv.sip_addr;
        set.spawn(async move {
            // Spread the calls out a little, as real ones are (a schedule, not a wait).
            tokio::time::sleep(Duration::from_millis(150 * seed)).await;
            lossy_call(server, seed, ear).await
        });
    }
    let mut done = Vec::new();
    let mut failed = Vec::new();
    while let Some(r) = set.join_next().await {
        match r.expect("caller task") {
            Ok(o) => done.push(o),
            Err(e) => failed.push(e),
        }
    }
    let sum = |f: fn(&Outcome) -> (u64, u64, u64, u64)| {
        done.iter().map(f).fold((0, 0, 0, 0), |a, b| {
            (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3)
        })
    };
    let (sip, rtp) = (sum(|o| o.sip), sum(|o| o.rtp));
    println!(
        "loss: {} of {CALLS} calls completed with {:.0}% of SIP and {:.0}% of RTP dropped, \
         {:.0}% duplicated, {:.0}% reordered each way; SIP forwarded {} dropped {} duplicated {} reordered {}; RTP \
         forwarded {} dropped {} duplicated {} reordered {}",
        done.len(),
        SIP_DROP * 100.0,
        RTP_DROP * 100.0,
        DUPLICATE * 100.0,
        REORDER * 100.0,
        sip.0,
        sip.1,
        sip.2,
        sip.3,
        rtp.0,
        rtp.1,
        rtp.2,
        rtp.3
    );
    assert!(failed.is_empty(), "calls failed: {failed:?}");
    assert!(sip.1 > 0 && rtp.1 > 0, "the relays did drop packets");
    assert!(
        done.iter().all(|o| o.told_number),
        "every caller heard their ticket number: {done:?}"
    );

    // One ticket per call, with the ZIP code exactly as keyed (no key lost or doubled).
    let tickets = srv.tickets.list(&Default::default()).await.unwrap();
    assert_eq!(tickets.len(), CALLS as usize, "one ticket per call");
    for o in &done {
        let t = tickets
            .iter()
            .find(|t| t.call_id.as_deref() == Some(o.call_id.as_str()))
            .unwrap_or_else(|| panic!("no ticket for {}", o.call_id));
        assert_eq!(t.service_code, "pothole");
        assert_eq!(t.zipcode.as_deref(), Some("94103"));
    }

    // Nothing is left once the transactions' 64·T1 has passed.
    let live = settle_metric(
        srv.http_addr,
        "ivr311_live_calls",
        0.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(live, 0.0);
    assert!(admin_calls(srv.http_addr).await.is_empty());
    let txns = settle_metric(srv.http_addr, "ivr311_sip_transactions", 0.0, TXN_LINGER).await;
    assert_eq!(txns, 0.0, "no transaction leaks");
    let m = metrics(srv.http_addr).await;
    assert_eq!(m["ivr311_sip_dialogs"], 0.0, "no dialog leaks");
    assert_eq!(
        m["ivr311_rtp_ports_free"], ports_idle,
        "every RTP port back"
    );
    srv.shutdown().await;
}
