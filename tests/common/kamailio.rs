//! The real Kamailio with the shipped configuration (`deploy/kamailio/kamailio.cfg`) in front
//! of real ivr311 node processes, all on loopback and free ports: the pieces the tests of the
//! SIP edge share (`tests/kamailio.rs`, `tests/kamailio_trunk.rs`).

use super::{options_probe, repo, until, TestUa};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Seconds between Kamailio's OPTIONS probes of each node.
pub const PROBE_INTERVAL: u64 = 1;

/// A port free for both TCP and UDP on 127.0.0.1.
pub fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A child process, killed when dropped (a failing test leaves nothing behind).
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

/// One ivr311 node: the real binary with the shipped menu, its own database and RTP ports.
pub struct Node {
    pub name: &'static str,
    pub sip: SocketAddr,
    pub http: SocketAddr,
    pub rtp: (u16, u16),
    pub db: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
    pub menu: Option<PathBuf>,
    pub process: Option<Process>,
}

impl Node {
    /// `extra` is added to the node's config (YAML); `menu` replaces the shipped menu.
    pub fn new(
        name: &'static str,
        dir: &Path,
        rtp: (u16, u16),
        db: &str,
        extra: &str,
        menu: Option<PathBuf>,
    ) -> Node {
        let config = dir.join(format!("{name}.yaml"));
        // The edge is the trunk: its calls are not counted against one source's limits.
        std::fs::write(
            &config,
            format!(
                "trunks:\n  allow: [\"127.0.0.1/32\"]\nlimits:\n  drain_seconds: 20\n\
                 storage:\n  recordings_dir: {}\n{extra}",
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
            menu,
            process: None,
        }
    }

    pub async fn start(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_ivr311"))
            .arg("serve")
            .args(["--sip", &self.sip.to_string()])
            .args(["--http", &self.http.to_string()])
            .args(["--db", &self.db.display().to_string()])
            .args(["--rtp-ports", &format!("{}-{}", self.rtp.0, self.rtp.1)])
            .args(["--config", &self.config.display().to_string()])
            .args(
                self.menu
                    .iter()
                    .flat_map(|m| ["--menu".to_owned(), m.display().to_string()]),
            )
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
    pub fn log(&self) -> PathBuf {
        self.log.clone()
    }

    /// Whether this node's media answered the call.
    pub fn has(&self, ua: &TestUa) -> bool {
        let port = ua.remote_rtp.expect("answered").port();
        (self.rtp.0..=self.rtp.1).contains(&port)
    }
}

/// Kamailio's main process, stopped when dropped with SIGTERM, which it passes on to its
/// worker processes and waits for. SIGKILL would stop it alone and leave its workers running:
/// holding the edge's port, probing nodes that are gone, registering with a carrier that is
/// gone.
pub struct Kamailio(Process);

impl Drop for Kamailio {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0 .0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.0 .0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Still up: the Process drop kills it.
    }
}

/// Kamailio with the shipped configuration on a free port, in front of `nodes`.
pub fn kamailio(dir: &Path, nodes: &[&Node]) -> (Kamailio, SocketAddr) {
    let edge: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    (kamailio_on(dir, nodes, edge, &[]), edge)
}

/// Kamailio with the shipped configuration listening on `edge` (UDP and TCP), in front of
/// `nodes`, with `defines` (each `NAME` or `NAME=value`) passed as `-A` after the test's own.
pub fn kamailio_on(dir: &Path, nodes: &[&Node], edge: SocketAddr, defines: &[String]) -> Kamailio {
    let list = dir.join("dispatcher.list");
    let lines: String = nodes.iter().map(|n| format!("1 sip:{}\n", n.sip)).collect();
    std::fs::write(&list, lines).unwrap();
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
        .args(defines.iter().flat_map(|d| ["-A", d.as_str()]))
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
    Kamailio(Process(child))
}

/// A call through the edge: answered (200, then ACK), or the final code it got.
pub async fn call(edge: SocketAddr) -> Result<TestUa, u16> {
    let mut ua = TestUa::udp(edge).await;
    let r = ua.call("0 101").await;
    if r.code == 200 {
        Ok(ua)
    } else {
        Err(r.code)
    }
}

/// A call the node answered, hung up at once (a caller who changed their mind).
pub async fn short_call(edge: SocketAddr) -> TestUa {
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
pub async fn until_a_call_reaches(edge: SocketAddr, node: &Node, within: Duration) -> TestUa {
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
pub async fn goes_on_and_ends(mut ua: TestUa) {
    ua.drain_rtp();
    let heard = ua.listen(Duration::from_millis(600)).await;
    assert!(
        heard.len() >= 10,
        "the call's audio goes on: {} frames",
        heard.len()
    );
    assert_eq!(ua.bye().await.code, 200, "the call ends normally");
}

/// The edge answers its own OPTIONS once it is up.
pub async fn until_edge_up(edge: SocketAddr) {
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
