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

use common::postgres::Postgres;
use common::*;
use ivr311::media::g711::Codec;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Seconds between Kamailio's OPTIONS probes of each node.
const PROBE_INTERVAL: u64 = 1;

fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A child process, killed when dropped (a failing test leaves nothing behind).
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

/// One ivr311 node: the real binary with the shipped menu, its own database and RTP ports.
struct Node {
    name: &'static str,
    sip: SocketAddr,
    http: SocketAddr,
    rtp: (u16, u16),
    db: PathBuf,
    log: PathBuf,
    config: PathBuf,
    process: Option<Process>,
}

impl Node {
    fn new(name: &'static str, dir: &Path, rtp: (u16, u16), db: &str) -> Node {
        let config = dir.join(format!("{name}.yaml"));
        // The edge is the trunk: its calls are not counted against one source's limits.
        std::fs::write(
            &config,
            format!(
                "trunks:\n  allow: [\"127.0.0.1/32\"]\nlimits:\n  drain_seconds: 20\n\
                 storage:\n  recordings_dir: {}\n",
                dir.join(format!("{name}-recordings")).display()
            ),
        )
        .unwrap();
        Node {
            name,
            sip: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            http: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            rtp,
            db: PathBuf::from(db),
            log: dir.join(format!("{name}.log")),
            config,
            process: None,
        }
    }

    async fn start(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_ivr311"))
            .arg("serve")
            .args(["--sip", &self.sip.to_string()])
            .args(["--http", &self.http.to_string()])
            .args(["--db", &self.db.display().to_string()])
            .args(["--rtp-ports", &format!("{}-{}", self.rtp.0, self.rtp.1)])
            .args(["--config", &self.config.display().to_string()])
            .current_dir(repo())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log())
                    .unwrap(),
            ))
            .spawn()
            .expect("the binary starts");
        let mut p = Process(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.http).await.is_err() {
            if let Ok(Some(status)) = p.0.try_wait() {
                panic!("node {} exited at start: {status}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not come up",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.process = Some(p);
    }

    /// Where the node's log goes (kept with the test's files when the test fails).
    fn log(&self) -> PathBuf {
        self.log.clone()
    }

    /// Whether this node's media answered the call.
    fn has(&self, ua: &TestUa) -> bool {
        let port = ua.remote_rtp.expect("answered").port();
        (self.rtp.0..=self.rtp.1).contains(&port)
    }
}

/// Kamailio with the shipped configuration on a free port, in front of `nodes`.
fn kamailio(dir: &Path, nodes: &[&Node]) -> (Process, SocketAddr) {
    let list = dir.join("dispatcher.list");
    let lines: String = nodes.iter().map(|n| format!("1 sip:{}\n", n.sip)).collect();
    std::fs::write(&list, lines).unwrap();
    let edge: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new("kamailio")
        .args(["-DD", "-E", "-m", "64", "-M", "8"])
        .args([
            "-f",
            &repo()
                .join("deploy/kamailio/kamailio.cfg")
                .display()
                .to_string(),
        ])
        .args(["-A", &format!("DISPATCHER_LIST=\"{}\"", list.display())])
        .args(["-A", &format!("PROBE_INTERVAL={PROBE_INTERVAL}")])
        .args(["-l", &format!("udp:{edge}"), "-l", &format!("tcp:{edge}")])
        .args(["-Y", &dir.display().to_string()])
        .args(["-P", &dir.join("kamailio.pid").display().to_string()])
        .args(["-w", &dir.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("kamailio.log")).unwrap(),
        ))
        .spawn()
        .expect("kamailio is installed (scripts/test installs it)");
    (Process(child), edge)
}

/// A call through the edge: answered (200, then ACK), or the final code it got.
async fn call(edge: SocketAddr) -> Result<TestUa, u16> {
    let mut ua = TestUa::udp(edge).await;
    let r = ua.call("0 101").await;
    if r.code == 200 {
        Ok(ua)
    } else {
        Err(r.code)
    }
}

/// A call the node answered, hung up at once (a caller who changed their mind).
async fn short_call(edge: SocketAddr) -> TestUa {
    let mut ua = call(edge).await.expect("the edge connects the call");
    ua.until_audio().await;
    assert_eq!(
        ua.bye().await.code,
        200,
        "BYE reaches the node through the edge"
    );
    ua
}

/// Calls until one is answered by `node` (each hung up), within `within`.
async fn until_a_call_reaches(edge: SocketAddr, node: &Node, within: Duration) -> TestUa {
    let deadline = Instant::now() + within;
    loop {
        let mut ua = call(edge).await.expect("the edge connects the call");
        if node.has(&ua) {
            return ua;
        }
        assert_eq!(ua.bye().await.code, 200);
        assert!(
            Instant::now() < deadline,
            "no call reached node {} within {within:?}",
            node.name
        );
    }
}

/// Audio keeps coming on `ua`'s call, and its BYE is answered.
async fn goes_on_and_ends(mut ua: TestUa) {
    ua.drain_rtp();
    let heard = ua.listen(Duration::from_millis(600)).await;
    assert!(
        heard.len() >= 10,
        "the call's audio goes on: {} frames",
        heard.len()
    );
    assert_eq!(ua.bye().await.code, 200, "the call ends normally");
}

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

/// The edge answers its own OPTIONS once it is up.
async fn until_edge_up(edge: SocketAddr) {
    until(
        "kamailio answers OPTIONS",
        Duration::from_secs(20),
        async || {
            let r = options_probe(edge, Duration::from_millis(300)).await?;
            (r.code == 200).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_behind_kamailio_survive_a_kill_and_a_drain_without_a_failed_call() {
    let dir = std::env::temp_dir().join(format!("ivr311-kamailio-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let pg = Postgres::start();
    let ports = serve_args().rtp_ports;
    let mid = ports.lo + (ports.hi - ports.lo) / 2;
    let mut a = Node::new("a", &dir, (ports.lo, mid - 1), &pg.url());
    let mut b = Node::new("b", &dir, (mid, ports.hi), &pg.url());
    a.start().await;
    b.start().await;
    let (_edge_process, edge) = kamailio(&dir, &[&a, &b]);
    until_edge_up(edge).await;

    // Calls are spread over both nodes.
    let on_a = until_a_call_reaches(edge, &a, Duration::from_secs(20)).await;
    let on_b = until_a_call_reaches(edge, &b, Duration::from_secs(20)).await;
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
