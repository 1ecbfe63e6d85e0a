//! The trunk registration done by one place: the real Kamailio with the shipped configuration
//! (`deploy/kamailio/kamailio.cfg` with `WITH_TRUNK_REGISTER`, the carrier account in a db_text
//! directory laid out as `deploy/kamailio/db/`) in front of two real ivr311 nodes, neither of
//! which has `trunks.register`, all on loopback.
//!
//! The test plays the carrier: its registrar (a UDP socket on 127.0.0.2) challenges the edge's
//! REGISTER with MD5 digest, checks the answer against the account's password, grants a short
//! binding and sees it refreshed before it lapses; then it calls the Contact the edge
//! registered, and a node answers with the line's menu. One REGISTER stream reaches the
//! registrar, from the edge, however many nodes there are; a node killed with SIGKILL does not
//! touch it, and the carrier's next call is answered by the other node.

mod common;

use common::kamailio::*;
use common::*;
use ivr311::media::g711::Codec;
use ivr311::sip::message::{parse_datagram, Message, Request, ResponseBuilder};
use md5::{Digest, Md5};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// The carrier account: the line's number is also its user name.
const LINE: &str = "3115550100";
const PASSWORD: &str = "carrier-s3cret";
const REALM: &str = "carrier.test";
/// The user part of the Contact the edge registers (`l_uuid`).
const CONTACT_USER: &str = "line311";
/// Seconds of binding the registrar grants (less than the 600 asked): the edge must refresh
/// within that.
const GRANTED: u64 = 20;

/// One REGISTER the registrar received, and what it answered.
#[derive(Debug)]
struct Received {
    from: SocketAddr,
    at: Instant,
    req: Request,
    code: u16,
    /// Why the credentials were refused (403), if they were.
    refused: Option<String>,
}

/// The carrier's registrar on 127.0.0.2: 401 with a fresh MD5 nonce to a REGISTER without
/// credentials, 200 (our Contact, `expires=GRANTED`) to one whose digest response is right
/// for the account's password, 403 otherwise. Every REGISTER is reported on the channel.
struct Registrar {
    addr: SocketAddr,
    seen: mpsc::Receiver<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Registrar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Registrar {
    async fn start() -> Registrar {
        let sock = UdpSocket::bind("127.0.0.2:0")
            .await
            .expect("127.0.0.2 is loopback on Linux");
        let addr = sock.local_addr().unwrap();
        let (tx, seen) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            let mut nonces: Vec<String> = Vec::new();
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(Message::Request(req)) = parse_datagram(&buf[..n], 65536) else {
                    continue;
                };
                if req.method.as_str() != "REGISTER" {
                    continue;
                }
                let (code, refused) = match req.header("Authorization") {
                    None => (401, None),
                    Some(auth) => match digest_ok(auth, &req.uri, &nonces) {
                        Ok(()) => (200, None),
                        Err(why) => (403, Some(why)),
                    },
                };
                let reply = match code {
                    401 => {
                        let nonce = format!("{:016x}", rand::random::<u64>());
                        nonces.push(nonce.clone());
                        ResponseBuilder::new(&req, 401, "Unauthorized", Some("reg"))
                            .header(
                                "WWW-Authenticate",
                                format_args!(
                                    "Digest realm=\"{REALM}\", nonce=\"{nonce}\", \
                                     qop=\"auth\", algorithm=MD5"
                                ),
                            )
                            .build()
                    }
                    200 => {
                        let contact = req.header("Contact").unwrap_or_default().to_owned();
                        ResponseBuilder::new(&req, 200, "OK", Some("reg"))
                            .header("Contact", format_args!("{contact};expires={GRANTED}"))
                            .build()
                    }
                    _ => ResponseBuilder::new(&req, 403, "Forbidden", Some("reg")).build(),
                };
                sock.send_to(&reply, from).await.unwrap();
                let seen = Received {
                    from,
                    at: Instant::now(),
                    req,
                    code,
                    refused,
                };
                if tx.send(seen).await.is_err() {
                    return;
                }
            }
        });
        Registrar { addr, seen, task }
    }

    /// The next REGISTER, within `within`.
    async fn next(&mut self, what: &str, within: Duration) -> Received {
        tokio::time::timeout(within, self.seen.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: no REGISTER within {within:?}"))
            .expect("the registrar runs")
    }
}

/// A parameter of a digest header value (`Digest k="v", k2=v2`).
fn param(value: &str, name: &str) -> Option<String> {
    value
        .trim()
        .strip_prefix("Digest")?
        .split(',')
        .find_map(|part| {
            let (k, v) = part.split_once('=')?;
            (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().trim_matches('"').to_owned())
        })
}

fn md5_hex(s: &str) -> String {
    format!("{:x}", Md5::digest(s.as_bytes()))
}

/// Whether `auth` (an Authorization value) answers one of our `nonces` for the account, as
/// RFC 2617 with qop=auth computes it from the password.
fn digest_ok(auth: &str, request_uri: &str, nonces: &[String]) -> Result<(), String> {
    let p = |name: &str| param(auth, name).ok_or(format!("no {name} in {auth}"));
    let (user, realm, nonce, uri) = (p("username")?, p("realm")?, p("nonce")?, p("uri")?);
    if user != LINE {
        return Err(format!("username {user}, not {LINE}"));
    }
    if realm != REALM {
        return Err(format!("realm {realm}"));
    }
    if !nonces.contains(&nonce) {
        return Err(format!("nonce {nonce} was never given"));
    }
    if uri != request_uri {
        return Err(format!(
            "digest uri {uri} is not the Request-URI {request_uri}"
        ));
    }
    if let Some(alg) = param(auth, "algorithm") {
        if !alg.eq_ignore_ascii_case("MD5") {
            return Err(format!("algorithm {alg}"));
        }
    }
    let ha1 = md5_hex(&format!("{user}:{realm}:{PASSWORD}"));
    let ha2 = md5_hex(&format!("REGISTER:{uri}"));
    let want = match param(auth, "qop").as_deref() {
        Some("auth") => {
            let (nc, cnonce) = (p("nc")?, p("cnonce")?);
            md5_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
        }
        None => md5_hex(&format!("{ha1}:{nonce}:{ha2}")),
        Some(other) => return Err(format!("qop {other}")),
    };
    if p("response")? != want {
        return Err("the digest response does not match the password".into());
    }
    Ok(())
}

/// The carrier's account as the operator installs it: the shipped `deploy/kamailio/db/`
/// (`version`, and `uacreg`'s column line) with one row for this registrar.
fn trunk_db(dir: &Path, registrar: SocketAddr) -> String {
    let db = dir.join("kamailio-db");
    std::fs::create_dir_all(&db).unwrap();
    let shipped = repo().join("deploy/kamailio/db");
    std::fs::copy(shipped.join("version"), db.join("version")).unwrap();
    let uacreg = std::fs::read_to_string(shipped.join("uacreg")).unwrap();
    let columns = uacreg.lines().next().unwrap();
    let proxy = format!("sip:{registrar}").replace(':', "\\:");
    std::fs::write(
        db.join("uacreg"),
        format!(
            "{columns}\n1:{CONTACT_USER}:{LINE}:city.example.net:{LINE}:{REALM}:{REALM}:\
             {LINE}:{PASSWORD}::{proxy}:600:0:0::\n"
        ),
    )
    .unwrap();
    format!("text://{}", db.display())
}

/// The carrier sends a call to the Contact the edge registered; a node answers with the
/// line's menu (the language choice of the shipped menu: a node's default menu is another
/// one, so the line's number reached it). Returns the call, answered.
async fn carrier_call(edge: SocketAddr) -> TestUa {
    let mut ua = TestUa::udp(edge).await;
    // The carrier rewrites the Request-URI to the registered Contact, To too.
    ua.request_user = CONTACT_USER.into();
    ua.to_user = CONTACT_USER.into();
    let r = ua.call("0 101").await;
    assert_eq!(r.code, 200, "a node answers the carrier's call");
    let line_menu = PromptEar::new("en", &["language_menu"], Codec::Pcmu);
    let other_menu = PromptEar::new("es", &["screening"], Codec::Pcmu);
    let heard = ua
        .listen_until("a greeting", Duration::from_secs(10), |h| {
            line_menu.frames_heard(h) >= 10 || other_menu.frames_heard(h) >= 10
        })
        .await;
    assert!(
        line_menu.frames_heard(&heard) >= 10 && other_menu.frames_heard(&heard) == 0,
        "the caller hears the line's menu"
    );
    ua
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_registers_the_line_once_for_all_nodes_and_keeps_it_when_a_node_dies() {
    let dir = std::env::temp_dir().join(format!("ivr311-edgetrunk-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut registrar = Registrar::start().await;
    let db = trunk_db(&dir, registrar.addr);

    // Two nodes, neither registering: their default menu is the Spanish one, the line's
    // number answers with the shipped menu.
    let ports = serve_args().rtp_ports;
    let mid = ports.lo + (ports.hi - ports.lo) / 2;
    let lines = format!("lines:\n  - {{number: \"{LINE}\", menu: menus/311.yaml}}\n");
    let other_menu = Some(repo().join("menus/spanish-direct.yaml"));
    let db_of = |n: &str| dir.join(format!("{n}.db")).display().to_string();
    let mut a = Node::new(
        "a",
        &dir,
        (ports.lo, mid - 1),
        &db_of("a"),
        &lines,
        other_menu.clone(),
    );
    let mut b = Node::new("b", &dir, (mid, ports.hi), &db_of("b"), &lines, other_menu);
    a.start().await;
    b.start().await;
    for node in [&a, &b] {
        let config = std::fs::read_to_string(&node.config).unwrap();
        assert!(!config.contains("register:"), "the nodes do not register");
    }
    let edge: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _edge_process = kamailio_on(
        &dir,
        &[&a, &b],
        edge,
        &[
            "WITH_TRUNK_REGISTER".to_owned(),
            format!("TRUNK_DB=\"{db}\""),
            format!("TRUNK_CONTACT=\"{edge}\""),
        ],
    );

    // The edge registers: challenged, it answers with the account's credentials, and its
    // Contact is its own address.
    let first = registrar
        .next("the edge registers at start", Duration::from_secs(30))
        .await;
    assert_eq!(first.from, edge, "the REGISTER comes from the edge");
    assert_eq!(first.code, 401);
    assert_eq!(first.req.uri, format!("sip:{REALM}"));
    let to = &first.req.to.raw;
    assert!(
        to.contains(&format!("sip:{LINE}@{REALM}")),
        "the account's address of record: {to}"
    );
    let contact = first.req.header("Contact").unwrap().to_owned();
    assert!(
        contact.contains(&format!("sip:{CONTACT_USER}@{edge}")),
        "the edge's own address is registered: {contact}"
    );
    let authed = registrar
        .next("the REGISTER with credentials", Duration::from_secs(5))
        .await;
    assert_eq!(authed.from, edge);
    assert_eq!(authed.req.call_id, first.req.call_id);
    assert!(authed.req.cseq > first.req.cseq);
    let auth = authed.req.header("Authorization").unwrap();
    assert_eq!(param(auth, "username").as_deref(), Some(LINE));
    assert_eq!(
        (authed.code, authed.refused.as_deref()),
        (200, None),
        "the digest answers the challenge with the account's password: {auth}"
    );
    let bound_at = authed.at;

    // The carrier's call to that Contact is answered by a node with the line's menu.
    until_edge_up(edge).await;
    let mut ua = carrier_call(edge).await;
    let (dead, survivor) = if a.has(&ua) {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    assert_eq!(ua.bye().await.code, 200, "the call ends normally");

    // That node dies. The registration is the edge's: nothing to re-register, and the
    // carrier's next call is answered by the other node.
    dead.process.take().unwrap().signal("-KILL");
    let mut ua = carrier_call(edge).await;
    assert!(
        survivor.has(&ua),
        "the carrier's call after the kill reaches the survivor"
    );
    ua.drain_rtp();
    assert!(ua.listen(Duration::from_millis(600)).await.len() >= 10);
    assert_eq!(ua.bye().await.code, 200, "the call ends normally");

    // The binding is refreshed before it lapses, in the same stream (Call-ID, CSeq on).
    let refresh = registrar
        .next(
            "the edge refreshes the binding",
            Duration::from_secs(GRANTED + 5),
        )
        .await;
    assert_eq!(refresh.from, edge);
    assert_eq!(refresh.req.call_id, first.req.call_id);
    assert!(refresh.req.cseq > authed.req.cseq);
    let refreshed = if refresh.code == 401 {
        registrar
            .next("the refresh with credentials", Duration::from_secs(5))
            .await
    } else {
        refresh
    };
    assert_eq!((refreshed.code, refreshed.refused), (200, None));
    assert_eq!(refreshed.req.call_id, first.req.call_id);
    assert!(
        refreshed.at < bound_at + Duration::from_secs(GRANTED),
        "refreshed {:?} after the binding, which lasts {GRANTED} s",
        refreshed.at - bound_at
    );
    assert_eq!(
        refreshed.req.header("Expires").map(str::trim),
        Some("600"),
        "the refresh asks for the account's expires again (never 0: no unregistering)"
    );
    assert_eq!(refreshed.req.header("Contact"), Some(contact.as_str()));

    // One stream reached the registrar: nothing else came in the whole test.
    while let Ok(more) = registrar.seen.try_recv() {
        assert_eq!(more.from, edge, "a REGISTER from somewhere else: {more:?}");
        assert_eq!(more.req.call_id, first.req.call_id);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
