//! Two ivr311 nodes behind a real Kamailio with the shipped configuration
//! (`deploy/kamailio/kamailio.cfg`), all on loopback: calls are spread over both nodes; when one
//! is killed with SIGKILL, new calls reach the other (Kamailio fails the INVITE over at once,
//! and its OPTIONS probe takes the dead node out) while the calls on the survivor go on; the
//! dead node, restarted, rejoins by itself; a node drained with SIGTERM answers its probe 503,
//! so new calls go to the other with not one failed, while its own call finishes.
//!
//! The nodes share one PostgreSQL store, started by the test: callers filing tickets while a
//! node is killed either heard their number, and then the ticket is in PostgreSQL exactly
//! once, or did not.

mod common;

use common::kamailio::*;
use common::postgres::Postgres;
use common::*;
use ivr311::media::g711::Codec;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A caller files a pothole report through the edge. Returns the call's Call-ID and
/// whether the caller heard that the ticket was filed (its number follows); not when the call
/// was cut before that (its node died).
async fn filing_call(edge: SocketAddr) -> (String, bool) {
    let ear = PromptEar::new("en", &["ticket_filed", "db_error"], Codec::Pcmu);
    let mut ua = call(edge).await.expect("the edge connects the call");
    let id = ua.call_id.clone();
    ua.until_audio().await;
    ua.keys("1111").await;
    ua.keys("94107").await;
    let mut heard = ua.skip_description("en").await;
    heard.extend(ua.listen(Duration::from_millis(3000)).await);
    let filed = ear.playbacks(&heard).iter().any(|p| p == "ticket_filed");
    // Hang up; a node that died answers nothing (the edge times the BYE out).
    let bye = ua.in_dialog("BYE", "", "");
    ua.send_raw(&bye).await;
    (id, filed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_behind_kamailio_survive_a_kill_and_a_drain_without_a_failed_call() {
    let dir = std::env::temp_dir().join(format!("ivr311-kamailio-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let pg = Postgres::start();
    let ports = serve_args().rtp_ports;
    let mid = ports.lo + (ports.hi - ports.lo) / 2;
    let mut a = Node::new("a", &dir, (ports.lo, mid - 1), &pg.url(), "", None);
    let mut b = Node::new("b", &dir, (mid, ports.hi), &pg.url(), "", None);
    a.start().await;
    b.start().await;
    let (_edge_process, edge) = kamailio(&dir, &[&a, &b]);
    until_edge_up(edge).await;

    // Calls are spread over both nodes.
    let on_a = until_a_call_reaches(edge, &a, Duration::from_secs(20)).await;
    let on_b = until_a_call_reaches(edge, &b, Duration::from_secs(20)).await;
    // A phone that sends everything to the edge and ignores Record-Route still ends its call:
    // its BYE, addressed to the node's Contact, is relayed to that node.
    let mut on_a = on_a;
    on_a.ignore_record_route();
    goes_on_and_ends(on_a).await;

    // Callers file tickets on both nodes, and A dies while they do.
    let filers: Vec<_> = (0..6).map(|_| tokio::spawn(filing_call(edge))).collect();
    until(
        "a filing caller is on node a",
        Duration::from_secs(10),
        async || {
            let (code, body) = http(a.http, "GET", "/admin/calls", &[], b"").await;
            (code == 200 && body.contains("call_id")).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // into the menu: A's callers are keying
                                                           // A dies. B's call goes on; every new call is answered, by B.
    a.process.take().unwrap().signal("-KILL");
    for _ in 0..8 {
        let ua = short_call(edge).await;
        assert!(b.has(&ua), "a call after the kill went to the dead node");
    }
    goes_on_and_ends(on_b).await;
    // Every caller who heard their ticket filed has it in PostgreSQL, once.
    let mut heard = 0;
    for f in filers {
        let (call_id, filed) = f.await.unwrap();
        let stored: u32 = pg
            .psql(
                common::postgres::DATABASE,
                &format!("SELECT count(*) FROM tickets WHERE call_id = '{call_id}'"),
            )
            .trim()
            .parse()
            .unwrap();
        if filed {
            heard += 1;
            assert_eq!(
                stored, 1,
                "a caller heard a ticket filed: it is stored once"
            );
        } else {
            // Cut off by the kill: stored or not, never twice.
            assert!(stored <= 1, "a ticket is stored once at most");
        }
    }
    assert!(heard > 0, "the callers on node b filed");

    // A comes back on the shared database and rejoins without anyone telling the edge.
    a.start().await;
    let back = until_a_call_reaches(edge, &a, Duration::from_secs(10 * PROBE_INTERVAL + 10)).await;

    // A drains (SIGTERM) while it has a call: its probe answers 503 and its INVITEs 503, so
    // every new call goes to B, and none fails. A's own call goes on to its end.
    a.process.as_ref().unwrap().signal("-TERM");
    until(
        "node a reports draining",
        Duration::from_secs(10),
        async || (http(a.http, "GET", "/health/ready", &[], b"").await.0 == 503).then_some(()),
    )
    .await;
    for _ in 0..8 {
        let ua = short_call(edge).await;
        assert!(
            b.has(&ua),
            "a call during the drain went to the draining node"
        );
    }
    goes_on_and_ends(back).await;
    let status = a.process.as_mut().unwrap().0.wait().unwrap();
    assert!(
        status.success(),
        "node a exits cleanly after its last call: {status:?}"
    );
    a.process = None;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shipped menu with its operators answering at every hour (the test runs any day).
fn menu_open_all_hours(dir: &Path) -> PathBuf {
    let shipped = std::fs::read_to_string(repo().join("menus/311.yaml")).unwrap();
    let mut lines: Vec<String> = Vec::new();
    let mut in_call_centre = false;
    for line in shipped.lines() {
        if line.starts_with("  call_centre:") {
            in_call_centre = true;
            lines.push(line.to_owned());
            lines.push("    time_zone: America/New_York".to_owned());
            lines.push("    open: {mon-sun: \"00:00-24:00\"}".to_owned());
            continue;
        }
        if in_call_centre {
            if line.trim().is_empty() || !line.starts_with("    ") {
                in_call_centre = false;
            } else {
                continue;
            }
        }
        lines.push(line.to_owned());
    }
    let path = dir.join("menu.yaml");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// The next INVITE to the operator's phone (ACKs and retransmitted answers skipped).
async fn operator_invite(agent: &TestAgent, within: Duration) -> ivr311::sip::message::Request {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.recv(left).await {
            Some(ivr311::sip::message::Message::Request(r)) if r.method.as_str() == "INVITE" => {
                return r
            }
            Some(ivr311::sip::message::Message::Request(r)) if r.method.as_str() == "BYE" => {
                panic!("a BYE while the operator waited for a call")
            }
            Some(_) => continue,
            None => panic!("the operator's phone did not ring within {within:?}"),
        }
    }
}

/// The operator is on a call until it ends (the caller hangs up): any INVITE meanwhile is a
/// second call offered at once. `within` bounds the wait for the BYE, answered 200.
async fn operator_on_call_until_bye(agent: &TestAgent, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.recv(left).await {
            Some(ivr311::sip::message::Message::Request(r)) if r.method.as_str() == "INVITE" => {
                panic!(
                    "the operator was offered a second call while on one: {:?}",
                    r.header("X-311-Call-ID")
                )
            }
            Some(ivr311::sip::message::Message::Request(r)) if r.method.as_str() == "BYE" => {
                agent.reply(&r, 200, "OK", None).await;
                return;
            }
            Some(_) => continue,
            None => panic!("the call did not end within {within:?}"),
        }
    }
}

/// Where the node wants the operator's audio: the c= and m=audio of its offer.
fn media_of(inv: &ivr311::sip::message::Request) -> SocketAddr {
    let sdp = String::from_utf8_lossy(&inv.body).into_owned();
    let ip = sdp
        .lines()
        .find_map(|l| l.strip_prefix("c=IN IP4 "))
        .expect("c= line")
        .trim()
        .to_owned();
    let port = sdp
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|m| m.split_whitespace().next())
        .expect("m=audio line")
        .to_owned();
    format!("{ip}:{port}").parse().unwrap()
}

/// The operator speaks: PCMU frames every 20 ms from its phone's RTP socket to `to`, for as
/// long as this runs.
async fn operator_talks(sock: &tokio::net::UdpSocket, to: SocketAddr) {
    let ssrc: u32 = rand::random();
    for seq in 0u16.. {
        let mut pkt = vec![0x80, 0x00];
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        pkt.extend_from_slice(&ssrc.to_be_bytes());
        pkt.extend(std::iter::repeat_n(0x55u8, 160));
        let _ = sock.send_to(&pkt, to).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!("sixty-five thousand frames")
}

/// What `GET /admin/<what>` says on `node`.
async fn admin_json(node: &Node, what: &str) -> serde_json::Value {
    let (code, body) = http(node.http, "GET", &format!("/admin/{what}"), &[], b"").await;
    assert_eq!(code, 200, "/admin/{what}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// How many callers wait in `node`'s queues.
async fn waiting_on(node: &Node) -> u64 {
    let q = admin_json(node, "queues").await;
    q.as_array()
        .into_iter()
        .flatten()
        .map(|q| q["waiting"].as_u64().unwrap_or(0))
        .sum()
}

/// A caller through the edge answered by `node`, asking for an operator (English, then 0).
async fn caller_for_operator(edge: SocketAddr, node: &Node) -> TestUa {
    let mut ua = until_a_call_reaches(edge, node, Duration::from_secs(30)).await;
    ua.until_audio().await;
    ua.keys("110").await;
    ua
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operator_takes_both_nodes_callers_one_at_a_time_in_arrival_order_and_outlives_a_node()
{
    let dir = std::env::temp_dir().join(format!("ivr311-cluster-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let pg = Postgres::start();
    let ports = serve_args().rtp_ports;
    let mid = ports.lo + (ports.hi - ports.lo) / 2;
    let menu = menu_open_all_hours(&dir);
    let operators = "agents:\n  - {id: \"1001\", password: \"pw1001\"}\n\
                     queues:\n  - {name: general, ring_timeout_seconds: 20, wrap_up_seconds: 0}\n";
    let mut a = Node::new(
        "a",
        &dir,
        (ports.lo, mid - 1),
        &pg.url(),
        operators,
        Some(menu.clone()),
    );
    let mut b = Node::new("b", &dir, (mid, ports.hi), &pg.url(), operators, Some(menu));
    a.start().await;
    b.start().await;
    let (_edge_process, edge) = kamailio(&dir, &[&a, &b]);
    until_edge_up(edge).await;

    // The operator's phone registers through the edge, with one node (its "home"); the
    // other learns of it from the store.
    let agent = TestAgent::login(edge, "1001").await;
    let home_node = until(
        "the registration is shared",
        Duration::from_secs(10),
        async || {
            let node = pg.psql(
                common::postgres::DATABASE,
                "SELECT node FROM cluster_agents WHERE agent_id = '1001'",
            );
            let node = node.trim().to_owned();
            (!node.is_empty()).then_some(node)
        },
    )
    .await;
    let (home, other) = if home_node.starts_with(&format!("{}/", a.sip)) {
        (&mut a, &mut b)
    } else {
        assert!(home_node.starts_with(&format!("{}/", b.sip)), "{home_node}");
        (&mut b, &mut a)
    };
    until(
        "the other node offers the operator calls",
        Duration::from_secs(10),
        async || (agent_state(other.http, "1001").await == "available").then_some(()),
    )
    .await;

    // A caller on the home node gets the operator.
    let mut first = caller_for_operator(edge, home).await;
    let inv = operator_invite(&agent, Duration::from_secs(10)).await;
    assert_eq!(inv.header("X-311-Call-ID"), Some(first.call_id.as_str()));
    agent.reply(&inv, 200, "OK", Some(agent.answer_sdp())).await;

    // Meanwhile a caller waits on the other node, then one on the home node: the other node
    // sees the operator busy, and nobody rings the operator a second time.
    let mut second = caller_for_operator(edge, other).await;
    until(
        "the other node's caller waits, the operator busy elsewhere",
        Duration::from_secs(10),
        async || {
            let busy = admin_json(other, "agents")
                .await
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["id"] == "1001" && v["busy_elsewhere"] == true);
            (busy && waiting_on(other).await == 1).then_some(())
        },
    )
    .await;
    let _third = caller_for_operator(edge, home).await;
    until(
        "the home node's caller waits",
        Duration::from_secs(10),
        async || (waiting_on(home).await == 1).then_some(()),
    )
    .await;

    // The first caller hangs up: the operator is free, and the caller who came first, on the
    // other node, gets the operator although the home node had its own caller waiting.
    assert_eq!(first.bye().await.code, 200);
    operator_on_call_until_bye(&agent, Duration::from_secs(10)).await;
    let inv = operator_invite(&agent, Duration::from_secs(10)).await;
    assert_eq!(
        inv.header("X-311-Call-ID"),
        Some(second.call_id.as_str()),
        "the earlier caller, on the other node, goes first"
    );
    agent.reply(&inv, 200, "OK", Some(agent.answer_sdp())).await;

    // Each node counted the claim it was granted.
    for node in [&*home, &*other] {
        let claims = metrics(node.http).await;
        let granted = claims.get("ivr311_cluster_claims_total{outcome=\"granted\"}");
        assert!(granted >= Some(&1.0), "node {}: {claims:?}", node.name);
    }

    // The home node, with the operator's registration and a waiting caller, dies. The call
    // on the other node goes on; the operator keeps getting calls, from the other node.
    home.process.take().unwrap().signal("-KILL");
    second.drain_rtp();
    let heard = tokio::select! {
        heard = second.until_packets(10) => heard,
        () = operator_talks(&agent.rtp, media_of(&inv)) => unreachable!(),
    };
    assert!(
        heard.len() >= 10,
        "the operator's voice reaches the caller on the surviving node"
    );
    assert_eq!(second.bye().await.code, 200);
    operator_on_call_until_bye(&agent, Duration::from_secs(10)).await;
    let mut fourth = caller_for_operator(edge, other).await;
    let inv = operator_invite(&agent, Duration::from_secs(15)).await;
    assert_eq!(inv.header("X-311-Call-ID"), Some(fourth.call_id.as_str()));
    agent.reply(&inv, 200, "OK", Some(agent.answer_sdp())).await;
    assert_eq!(fourth.bye().await.code, 200);
    operator_on_call_until_bye(&agent, Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
