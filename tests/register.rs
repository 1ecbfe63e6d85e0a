//! Integration: operators log in by registering a SIP phone with the real server.
//!
//! The server runs with one agent configured ("1001", password "pw"); the phone is a plain UDP
//! socket that builds its REGISTERs by hand and answers the digest challenge itself, so what is
//! asserted is exactly what goes over the wire.

mod common;

use ivr311::config::{AgentConfig, FileConfig};
use ivr311::server::RunningServer;
use ivr311::sip::message::{parse_datagram, Message, Response};
use md5::Md5;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::timeout;

fn agents() -> FileConfig {
    FileConfig {
        agents: vec![AgentConfig {
            id: "1001".into(),
            password: "pw".into(),
            skills: vec![],
            tier: 1,
            name: None,
            role: Default::default(),
        }],
        ..FileConfig::default()
    }
}

/// A phone: one UDP socket, one registration Call-ID, its own CSeq.
struct Phone {
    sock: UdpSocket,
    local: SocketAddr,
    server: SocketAddr,
    user: String,
    call_id: String,
    cseq: u32,
    branch: u32,
}

impl Phone {
    async fn new(server: &RunningServer, user: &str) -> Phone {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = sock.local_addr().unwrap();
        Phone {
            sock,
            local,
            server: server.sip_addr,
            user: user.to_owned(),
            call_id: format!("reg-{}@test", rand::random::<u32>()),
            cseq: 0,
            branch: 0,
        }
    }

    fn request_uri(&self) -> String {
        format!("sip:{}", self.server)
    }

    /// A REGISTER with a new branch and the next CSeq.
    fn build(&mut self, contact: Option<&str>, extra: &[String]) -> String {
        self.cseq += 1;
        self.branch += 1;
        let mut s = format!(
            "REGISTER {uri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {local};branch=z9hG4bK-reg-{b}-{cid};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:{user}@{server}>;tag=phone{b}\r\n\
To: <sip:{user}@{server}>\r\n\
Call-ID: {cid}\r\n\
CSeq: {cseq} REGISTER\r\n",
            uri = self.request_uri(),
            local = self.local,
            b = self.branch,
            cid = self.call_id,
            user = self.user,
            server = self.server,
            cseq = self.cseq,
        );
        if let Some(c) = contact {
            s.push_str(&format!("Contact: {c}\r\n"));
        }
        for e in extra {
            s.push_str(e);
            s.push_str("\r\n");
        }
        s.push_str("User-Agent: register-test\r\nContent-Length: 0\r\n\r\n");
        s
    }

    async fn send_raw(&self, msg: &str) -> Response {
        self.sock
            .send_to(msg.as_bytes(), self.server)
            .await
            .unwrap();
        self.recv().await.expect("a response to REGISTER")
    }

    async fn recv(&self) -> Option<Response> {
        let mut buf = vec![0u8; 65535];
        let (n, _) = timeout(Duration::from_secs(2), self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        match parse_datagram(&buf[..n], 65535) {
            Ok(Message::Response(r)) => Some(r),
            other => panic!("expected a response, got {other:?}"),
        }
    }

    async fn register(&mut self, contact: Option<&str>, extra: &[String]) -> Response {
        let msg = self.build(contact, extra);
        self.send_raw(&msg).await
    }

    /// REGISTER, answer the 401 with `password` (SHA-256), and return the second answer.
    async fn login(&mut self, password: &str, contact: Option<&str>, extra: &[String]) -> Response {
        let challenge = self.register(contact, extra).await;
        assert_eq!(challenge.code, 401, "{challenge:?}");
        let mut extra = extra.to_vec();
        let auth = authorization(
            &challenge,
            "SHA-256",
            &self.user,
            password,
            &self.request_uri(),
        );
        extra.push(format!("Authorization: {auth}"));
        self.register(contact, &extra).await
    }
}

/// One parameter of a `WWW-Authenticate` value (quoted or not).
fn param(challenge: &str, name: &str) -> Option<String> {
    let rest = challenge.strip_prefix("Digest ")?;
    for part in rest.split(", ") {
        if let Some((k, v)) = part.split_once('=') {
            if k.trim() == name {
                return Some(v.trim().trim_matches('"').to_owned());
            }
        }
    }
    None
}

fn hash(algorithm: &str, data: &str) -> String {
    let bytes: Vec<u8> = if algorithm == "MD5" {
        Md5::digest(data.as_bytes()).to_vec()
    } else {
        Sha256::digest(data.as_bytes()).to_vec()
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 7616 `qop=auth` credentials answering the `algorithm` challenge of `resp`.
fn authorization(
    resp: &Response,
    algorithm: &str,
    user: &str,
    password: &str,
    uri: &str,
) -> String {
    let challenge = resp
        .headers_named("WWW-Authenticate")
        .find(|c| param(c, "algorithm").as_deref() == Some(algorithm))
        .expect("a challenge for the algorithm");
    let realm = param(challenge, "realm").expect("realm");
    let nonce = param(challenge, "nonce").expect("nonce");
    let opaque = param(challenge, "opaque").expect("opaque");
    let cnonce = format!("{:08x}", rand::random::<u32>());
    let nc = "00000001";
    let ha1 = hash(algorithm, &format!("{user}:{realm}:{password}"));
    let ha2 = hash(algorithm, &format!("REGISTER:{uri}"));
    let response = hash(
        algorithm,
        &format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"),
    );
    format!(
        "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
         response=\"{response}\", algorithm={algorithm}, qop=auth, nc={nc}, cnonce=\"{cnonce}\", \
         opaque=\"{opaque}\""
    )
}

fn contacts(resp: &Response) -> Vec<String> {
    resp.headers_named("Contact").map(str::to_owned).collect()
}

#[tokio::test]
async fn phone_logs_in_with_digest_and_logs_out() {
    let server = common::start_server(agents()).await;
    let mut phone = Phone::new(&server, "1001").await;
    let contact = format!("<sip:1001@{}>", phone.local);

    // The challenge: two WWW-Authenticate, SHA-256 first, then MD5, both qop=auth.
    let challenge = phone.register(Some(&contact), &[]).await;
    assert_eq!(challenge.code, 401);
    assert_eq!(challenge.reason, "Unauthorized");
    assert!(challenge.to.tag().is_some());
    let www: Vec<&str> = challenge.headers_named("WWW-Authenticate").collect();
    assert_eq!(www.len(), 2, "{www:?}");
    assert_eq!(param(www[0], "algorithm").as_deref(), Some("SHA-256"));
    assert_eq!(param(www[1], "algorithm").as_deref(), Some("MD5"));
    for w in &www {
        assert_eq!(param(w, "qop").as_deref(), Some("auth"));
        assert_eq!(param(w, "realm").as_deref(), Some("ivr311"));
        assert!(param(w, "opaque").is_some());
        assert_eq!(param(w, "stale"), None);
    }
    assert_eq!(param(www[0], "nonce"), param(www[1], "nonce"));

    // The answer with SHA-256: logged in, the binding listed with its expiry.
    let auth = authorization(&challenge, "SHA-256", "1001", "pw", &phone.request_uri());
    let ok = phone
        .register(
            Some(&contact),
            &["Expires: 600".into(), format!("Authorization: {auth}")],
        )
        .await;
    assert_eq!((ok.code, ok.reason.as_str()), (200, "OK"), "{ok:?}");
    assert_eq!(contacts(&ok), vec![format!("{contact};expires=600")]);

    // MD5 works as well; a query (no Contact) lists the binding.
    let challenge = phone.register(None, &[]).await;
    let auth = authorization(&challenge, "MD5", "1001", "pw", &phone.request_uri());
    let ok = phone
        .register(None, &[format!("Authorization: {auth}")])
        .await;
    assert_eq!(ok.code, 200);
    let listed = contacts(&ok);
    assert_eq!(listed.len(), 1);
    assert!(listed[0].starts_with(&format!("{contact};expires=")));

    // The wrong password: 401 with a fresh challenge, nothing else.
    let bad = phone.login("wrong", Some(&contact), &[]).await;
    assert_eq!(bad.code, 401);
    assert_eq!(bad.headers_named("WWW-Authenticate").count(), 2);

    // Too short: 423 with Min-Expires.
    let brief = phone
        .login("pw", Some(&format!("{contact};expires=10")), &[])
        .await;
    assert_eq!(brief.code, 423);
    assert_eq!(brief.header("Min-Expires"), Some("60"));

    // Log out: expires=0 leaves no binding.
    let out = phone
        .login("pw", Some(&format!("{contact};expires=0")), &[])
        .await;
    assert_eq!(out.code, 200);
    assert!(contacts(&out).is_empty(), "{out:?}");

    // Log in again, then `Contact: *` with `Expires: 0` removes everything.
    let ok = phone.login("pw", Some(&contact), &[]).await;
    assert_eq!(contacts(&ok).len(), 1);
    let out = phone.login("pw", Some("*"), &["Expires: 0".into()]).await;
    assert_eq!(out.code, 200);
    assert!(contacts(&out).is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_agent_gets_the_same_answer_as_a_wrong_password() {
    let server = common::start_server(agents()).await;
    let mut known = Phone::new(&server, "1001").await;
    let mut unknown = Phone::new(&server, "4242").await;
    let a = known.login("nope", None, &[]).await;
    let b = unknown.login("pw", None, &[]).await;
    assert_eq!((a.code, b.code), (401, 401));
    let shape = |r: &Response| -> Vec<String> {
        r.headers
            .iter()
            .map(|h| {
                let mut v = h.value.clone();
                for p in ["nonce", "opaque"] {
                    if let Some(x) = param(&h.value, p) {
                        v = v.replace(&x, "X");
                    }
                }
                match h.name.as_str() {
                    "WWW-Authenticate" | "Server" | "Content-Length" => format!("{}: {v}", h.name),
                    other => other.to_owned(),
                }
            })
            .collect()
    };
    assert_eq!(shape(&a), shape(&b));
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_bad_attempts_gets_403() {
    let server = common::start_server(agents()).await;
    let mut thief = Phone::new(&server, "1001").await;

    // One bad REGISTER retransmitted is one failure: the transaction absorbs the copies.
    let challenge = thief.register(None, &[]).await;
    let auth = authorization(&challenge, "SHA-256", "1001", "guess", &thief.request_uri());
    let msg = thief.build(None, &[format!("Authorization: {auth}")]);
    for _ in 0..6 {
        assert_eq!(thief.send_raw(&msg).await.code, 401);
    }

    // Four more failures make five: from then on 403, without a challenge.
    for i in 0..4 {
        let r = thief.login(&format!("guess{i}"), None, &[]).await;
        assert_eq!(r.code, 401, "attempt {i}");
    }
    // Blocked: still challenged (a phone there needs a challenge to prove itself), but every
    // answer is refused with 403, without a new challenge.
    let blocked = thief.login("guess5", None, &[]).await;
    assert_eq!(blocked.code, 403);
    assert_eq!(blocked.headers_named("WWW-Authenticate").count(), 0);

    // Every port of that address is refused, even with the right password: it is not an
    // address agent 1001 has logged in from.
    let mut same_host = Phone::new(&server, "1001").await;
    assert_eq!(same_host.login("pw", None, &[]).await.code, 403);
    server.shutdown().await;
}

#[tokio::test]
async fn options_lists_register_and_without_agents_register_is_forbidden() {
    let with = common::start_server(agents()).await;
    let phone = Phone::new(&with, "1001").await;
    let options = format!(
        "OPTIONS sip:{s} SIP/2.0\r\n\
Via: SIP/2.0/UDP {l};branch=z9hG4bK-opt-1\r\n\
Max-Forwards: 70\r\n\
From: <sip:mon@{l}>;tag=m\r\n\
To: <sip:{s}>\r\n\
Call-ID: opt-1@test\r\n\
CSeq: 1 OPTIONS\r\n\
Content-Length: 0\r\n\r\n",
        s = with.sip_addr,
        l = phone.local
    );
    let r = phone.send_raw(&options).await;
    assert_eq!(r.code, 200);
    assert!(r.header("Allow").is_some_and(|a| a.contains("REGISTER")));
    with.shutdown().await;

    let without = common::start_server(FileConfig::default()).await;
    let mut phone = Phone::new(&without, "1001").await;
    let r = phone.register(Some("<sip:1001@127.0.0.1:5999>"), &[]).await;
    assert_eq!(r.code, 403);
    assert_eq!(r.headers_named("WWW-Authenticate").count(), 0);
    without.shutdown().await;
}

/// Poll `/health` until the trunk registration is in `state` (or give up after `within`).
async fn trunk_state(http: SocketAddr, state: &str, within: Duration) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let h = common::health(http).await;
        if h["trunk_registration"]["state"] == state || tokio::time::Instant::now() > deadline {
            return h["trunk_registration"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node that registers with `trunk` as `city311`, naming the registrar by `host` (with the
/// trunk's port).
fn registering_node(trunk: &RunningServer, host: &str, password: &str) -> FileConfig {
    let mut file = FileConfig::default();
    file.trunks.register = Some(ivr311::sip::trunk::RegisterConfig {
        registrar: format!("sip:{host}:{}", trunk.sip_addr.port()),
        user: "city311".into(),
        domain: None,
        expires: 600,
    });
    file.trunks.auth = ivr311::sip::registrar::Credentials {
        username: "city311".into(),
        password: password.into(),
        realm: None,
    }
    .into();
    file
}

/// A 311 line behind a registration-based trunk: the node registers (the trunk here is another
/// ivr311, whose registrar checks the digest exactly as it does for operators' phones), shows
/// it in `/health` and `/metrics`, and removes the binding as soon as it starts draining, so
/// the trunk stops sending calls to a node that would refuse them.
#[tokio::test]
async fn a_node_registers_with_a_trunk_that_asks_for_credentials_and_unbinds_when_draining() {
    let mut trunk_file = agents();
    trunk_file.agents[0].id = "city311".into();
    trunk_file.agents[0].password = "s3cret".into();
    let trunk = common::start_server(trunk_file).await;
    assert_eq!(
        common::agent_state(trunk.http_addr, "city311").await,
        "logged_out"
    );

    // The registrar named as carriers name theirs: by host name, looked up before each REGISTER.
    let node = common::start_server(registering_node(&trunk, "localhost", "s3cret")).await;
    let status = trunk_state(node.http_addr, "registered", Duration::from_secs(3)).await;
    assert_eq!(status["state"], "registered", "{status}");
    assert_eq!(
        status["aor"],
        format!("sip:city311@localhost:{}", trunk.sip_addr.port())
    );
    // Our registrar grants what was asked (600 s, within its limits).
    let left = status["expires_in"].as_u64().unwrap();
    assert!((590..=600).contains(&left), "{status}");
    // The trunk has the binding: its "agent" is logged in.
    assert_eq!(
        common::agent_state(trunk.http_addr, "city311").await,
        "available"
    );
    let (_, metrics) = common::http(node.http_addr, "GET", "/metrics", &[], b"").await;
    assert!(metrics.contains("ivr311_trunk_registered 1"), "{metrics}");

    // Stop: the binding goes at the start of the drain, not when the process ends.
    let stop = tokio::spawn(node.shutdown());
    let mut state = String::new();
    for _ in 0..40 {
        state = common::agent_state(trunk.http_addr, "city311").await;
        if state == "logged_out" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, "logged_out", "the trunk still sends us calls");
    stop.await.unwrap();
    trunk.shutdown().await;
}

/// A carrier whose registrar name has two addresses, the first of them out of service (503,
/// Retry-After 300): the node's next REGISTER goes at once to the second address, where it
/// registers (RFC 3263 section 4.3), rather than leaving the 311 number unreachable for the
/// five minutes the first address asked for.
#[tokio::test]
async fn a_node_whose_registrar_name_has_a_failing_first_address_registers_at_the_next() {
    let dns = common::dns::TestDns::start().await;
    dns.address("registrar.test", [127, 0, 0, 2].into())
        .address("registrar.test", [127, 0, 0, 1].into());
    let mut trunk_file = agents();
    trunk_file.agents[0].id = "city311".into();
    trunk_file.agents[0].password = "s3cret".into();
    let trunk = common::start_server(trunk_file).await;
    let down = UdpSocket::bind(("127.0.0.2", trunk.sip_addr.port()))
        .await
        .expect("127.0.0.2 is loopback on Linux");
    let refuse = async {
        let mut buf = vec![0u8; 65535];
        // The deadline covers the node's start too (prompts loaded, database opened), which
        // takes seconds on a loaded machine.
        let (n, from) = timeout(Duration::from_secs(30), down.recv_from(&mut buf))
            .await
            .expect("the first address gets the first REGISTER")
            .unwrap();
        let Message::Request(reg) = parse_datagram(&buf[..n], 65536).unwrap() else {
            panic!("not a request")
        };
        assert_eq!(reg.method.as_str(), "REGISTER");
        let no = ivr311::sip::message::ResponseBuilder::new(&reg, 503, "Service Unavailable", None)
            .header("Retry-After", "300")
            .build();
        down.send_to(&no, from).await.unwrap();
    };
    let mut node_file = registering_node(&trunk, "registrar.test", "s3cret");
    node_file.dns = dns.config();
    let node = common::start_server(node_file);
    let (node, ()) = tokio::join!(node, refuse);
    let status = trunk_state(node.http_addr, "registered", Duration::from_secs(3)).await;
    assert_eq!(status["state"], "registered", "{status}");
    assert_eq!(
        common::agent_state(trunk.http_addr, "city311").await,
        "available"
    );
    // Nothing more went to the failed address.
    let mut buf = [0u8; 2048];
    assert!(down.try_recv_from(&mut buf).is_err());
    node.shutdown().await;
    trunk.shutdown().await;
}

/// A carrier that takes SIP over TCP only (`;transport=tcp` on the registrar): the node
/// registers over a connection it opens (Via TCP, Contact `;transport=tcp`) and keeps that
/// connection open past the idle limit, since the carrier sends the line's calls back along it
/// (the only way to reach a node behind NAT); such a call is answered; and when the node
/// drains, the binding is removed over the same connection.
#[tokio::test]
async fn a_node_registers_over_tcp_and_takes_the_trunks_calls_on_that_connection() {
    let carrier = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = carrier.local_addr().unwrap().port();
    let mut file = FileConfig::default();
    file.trunks.register = Some(ivr311::sip::trunk::RegisterConfig {
        registrar: format!("sip:127.0.0.1:{port};transport=tcp"),
        user: "city311".into(),
        domain: None,
        expires: 600,
    });
    file.limits.tcp_idle_seconds = 1;
    let node = common::start_server(file).await;
    let (stream, _) = timeout(Duration::from_secs(5), carrier.accept())
        .await
        .expect("the node connects to the TCP registrar")
        .unwrap();
    let mut trunk = common::TestUa::tcp_accepted(stream, node.sip_addr).await;

    // The REGISTER says TCP; the carrier grants it (a plain 200: the asked 600 s).
    let reg = trunk
        .expect_request("REGISTER", Duration::from_secs(5))
        .await;
    let via = reg.header("Via").unwrap_or_default().to_owned();
    assert!(via.starts_with("SIP/2.0/TCP "), "{via}");
    let contact = reg.header("Contact").unwrap_or_default().to_owned();
    assert!(contact.contains(";transport=tcp"), "{contact}");
    let status = trunk_state(node.http_addr, "registered", Duration::from_secs(3)).await;
    assert_eq!(status["state"], "registered", "{status}");

    // Past the node's idle limit, the carrier's call comes along the registration's
    // connection and is answered there. (Not a wait: the idle time passing is the case.)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let answer = trunk.call("0 101").await;
    assert_eq!(answer.code, 200, "{answer:?}");
    assert_eq!(trunk.bye().await.code, 200);

    // Draining: the binding goes, over the same connection.
    let stop = tokio::spawn(node.shutdown());
    let unreg = trunk
        .expect_request("REGISTER", Duration::from_secs(5))
        .await;
    assert_eq!(unreg.header("Expires"), Some("0"), "{unreg:?}");
    stop.await.unwrap();
}

/// A carrier that takes SIP over TCP only, whose registrar name has two addresses, the first
/// refusing connections: the node's next REGISTER goes at once to the second address, over a
/// connection opened there (RFC 3263 section 4.3), rather than to the refusing address again
/// and then, after the back-off, nowhere for 30 s.
#[tokio::test]
async fn a_tcp_registrar_name_whose_first_address_refuses_connections_is_registered_at_the_next() {
    let carrier = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = carrier.local_addr().unwrap().port();
    // Nothing listens on 127.0.0.2 at that port: a connection there is refused at once.
    let dns = common::dns::TestDns::start().await;
    dns.address("registrar.test", [127, 0, 0, 2].into())
        .address("registrar.test", [127, 0, 0, 1].into());
    let mut file = FileConfig::default();
    file.trunks.register = Some(ivr311::sip::trunk::RegisterConfig {
        registrar: format!("sip:registrar.test:{port};transport=tcp"),
        user: "city311".into(),
        domain: None,
        expires: 600,
    });
    file.dns = dns.config();
    let node = common::start_server(file).await;
    let (stream, _) = timeout(Duration::from_secs(5), carrier.accept())
        .await
        .expect("the node connects to the registrar's second address")
        .unwrap();
    let mut trunk = common::TestUa::tcp_accepted(stream, node.sip_addr).await;
    let reg = trunk
        .expect_request("REGISTER", Duration::from_secs(5))
        .await;
    assert!(reg
        .header("Via")
        .unwrap_or_default()
        .starts_with("SIP/2.0/TCP "));
    let status = trunk_state(node.http_addr, "registered", Duration::from_secs(3)).await;
    assert_eq!(status["state"], "registered", "{status}");
    node.shutdown().await;
}

#[tokio::test]
async fn a_refused_trunk_password_is_reported_not_retried_in_a_loop() {
    let mut trunk_file = agents();
    trunk_file.agents[0].id = "city311".into();
    trunk_file.agents[0].password = "s3cret".into();
    let trunk = common::start_server(trunk_file).await;
    let node = common::start_server(registering_node(&trunk, "127.0.0.1", "wrong")).await;
    let status = trunk_state(node.http_addr, "failed", Duration::from_secs(3)).await;
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("401 Unauthorized: the registrar refused trunks.auth"),
        "{status}"
    );
    // The next try is tens of seconds away (30 s with jitter), not an immediate loop.
    let retry = status["retry_in"].as_u64().unwrap();
    assert!((14..=30).contains(&retry), "{status}");
    let (_, metrics) = common::http(node.http_addr, "GET", "/metrics", &[], b"").await;
    assert!(metrics.contains("ivr311_trunk_registered 0"), "{metrics}");
    assert_eq!(
        common::agent_state(trunk.http_addr, "city311").await,
        "logged_out"
    );
    node.shutdown().await;

    // A registrar name that does not resolve (RFC 2606 .invalid): failed, saying which name.
    let node = common::start_server(registering_node(
        &trunk,
        "no-such-registrar.invalid",
        "s3cret",
    ))
    .await;
    let status = trunk_state(node.http_addr, "failed", Duration::from_secs(5)).await;
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("no-such-registrar.invalid"),
        "{status}"
    );
    node.shutdown().await;
    trunk.shutdown().await;
}
