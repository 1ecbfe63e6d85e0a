//! Crash safety: the real binary is killed with SIGKILL while callers file tickets and one is
//! redirected to 911, at a different moment each round, and restarted on the same database.
//!
//! After every kill: the database opens and passes `PRAGMA integrity_check`; every ticket row
//! is whole (one INSERT: all its fields or none); every ticket number a caller heard read back
//! is there (it is read only after the commit); every caller who heard the 911 announcement
//! has its audit row (the announcement waits for the audit commit); and every audit row of an
//! earlier round is still there, unchanged.

mod common;

use common::*;
use ivr311::dispatch::tickets::{Channel, EmergencyAuditRow, Status, TicketStore};
use ivr311::media::g711::Codec;
use ivr311::media::{rtp, sdp};
use ivr311::sip::message::Message;
use sqlx::Connection;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Callers per round; the one at [`EMERGENCY`] presses 9 at the screening prompt.
const CALLERS: usize = 8;
const EMERGENCY: usize = 1;
/// Callers start this far apart, so each kill finds them at different steps: keying, filing
/// (the moment of the commit), hearing the number, or done.
const STAGGER: Duration = Duration::from_millis(800);
/// When the server is killed in each round, from the first caller's start. A caller needs
/// about 16 s from its INVITE to the last digit of its number (its ZIP is read back, and the
/// description is skipped during the recording prompt that follows).
const KILL_AFTER_MS: [u64; 3] = [6_300, 12_700, 18_100];

/// The server binary, killed when dropped (so a failing test leaves no process behind).
struct Server {
    child: Child,
    sip: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Setup {
    db: PathBuf,
    rtp_ports: String,
    config: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let args = serve_args();
        let dir = std::env::temp_dir().join(format!("ivr311-crash-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "limits:\n  drain_seconds: 0\nstorage:\n  recordings_dir: {}\n",
                dir.join("recordings").display()
            ),
        )
        .unwrap();
        Setup {
            db: dir.join("tickets.db"),
            rtp_ports: format!("{}-{}", args.rtp_ports.lo, args.rtp_ports.hi),
            config,
        }
    }

    async fn start(&self) -> Server {
        let (sip, http): (SocketAddr, SocketAddr) = (
            format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        );
        let child = Command::new(env!("CARGO_BIN_EXE_ivr311"))
            .arg("serve")
            .args(["--sip", &sip.to_string(), "--http", &http.to_string()])
            .args(["--db", &self.db.display().to_string()])
            .args(["--rtp-ports", &self.rtp_ports])
            .args(["--config", &self.config.display().to_string()])
            .current_dir(repo())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts");
        let mut server = Server { child, sip };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(http).await.is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "the server exited at start: {status} (database {:?})",
                    self.db
                );
            }
            assert!(Instant::now() < deadline, "the server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(health(http).await["status"], "ok", "the database opened");
        server
    }
}

/// What one caller heard, and which call it was.
struct Heard {
    call_id: String,
    emergency: bool,
    prompts: Vec<String>,
}

impl Heard {
    /// The ticket number read back in full, if it was.
    fn ticket_number(&self) -> Option<u64> {
        let at = self.prompts.iter().position(|p| p == "ticket_filed")?;
        let digits: String = self.prompts[at + 1..]
            .iter()
            .take(8)
            .map_while(|p| p.strip_prefix("digit_"))
            .collect();
        (digits.len() == 8).then(|| digits.parse().ok()).flatten()
    }

    fn heard_911_announcement(&self) -> bool {
        self.prompts.iter().any(|p| p == "emergency_announce")
    }
}

/// RTP until the server stops sending for a second (it was killed) or `max` has passed.
async fn listen_until_silent(ua: &TestUa, max: Duration) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + max;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let quiet = tokio::time::Instant::now() + Duration::from_secs(1);
        match tokio::time::timeout_at(deadline.min(quiet), ua.rtp.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                if let Ok(p) = rtp::parse(&buf[..n]) {
                    out.push(p.payload.to_vec());
                }
            }
            _ => return out,
        }
    }
}

/// INVITE and ACK, or false if the server does not answer (it was killed).
async fn try_call(ua: &mut TestUa) -> bool {
    let offer = ua.offer("0 101");
    let invite = ua.invite_bytes(&offer);
    ua.send_raw(&invite).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ua
            .recv(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Some(Message::Response(r)) if r.cseq_method.as_str() == "INVITE" && r.code >= 200 => {
                let Ok(answer) = sdp::parse(&r.body) else {
                    return false;
                };
                ua.to_tag = r.to.tag().map(str::to_owned);
                ua.remote_rtp = Some(answer.addr);
                ua.ack().await;
                return r.code == 200;
            }
            Some(_) => continue,
            None => return false,
        }
    }
}

async fn caller(sip: SocketAddr, start: Duration, emergency: bool, ear: Arc<PromptEar>) -> Heard {
    // Callers arrive one after another (the schedule under test): not a wait.
    tokio::time::sleep(start).await;
    let mut ua = TestUa::udp(sip).await;
    let mut heard = Heard {
        call_id: ua.call_id.clone(),
        emergency,
        prompts: Vec::new(),
    };
    // The call itself may meet the kill: then nothing was heard.
    if !try_call(&mut ua).await {
        return heard;
    }
    if emergency {
        ua.keys("19").await;
    } else {
        ua.keys("1111").await;
        ua.keys("94103").await;
        ua.skip_description("en").await; // no description: file at once
    }
    let payloads = listen_until_silent(&ua, Duration::from_secs(20)).await;
    heard.prompts = ear.playbacks(&payloads);
    heard
}

/// Every check on the database the killed server left behind; returns its audit rows.
async fn check_database(
    db: &Path,
    heard: &[Heard],
    earlier_audits: &BTreeMap<i64, EmergencyAuditRow>,
) -> (usize, BTreeMap<i64, EmergencyAuditRow>) {
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("the database opens after the kill");
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(check, "ok", "integrity_check");
    conn.close().await.unwrap();

    let store = TicketStore::open(db).await.expect("the store opens");
    let tickets = store.list(&Default::default()).await.unwrap();
    let ours: HashMap<&str, &Heard> = heard.iter().map(|h| (h.call_id.as_str(), h)).collect();
    let mut by_call = HashSet::new();
    for t in &tickets {
        // Whole: every field the call flow writes is there together.
        assert_eq!(t.service_code, "pothole", "{t:?}");
        assert!(!t.service_name.is_empty(), "{t:?}");
        assert_eq!(t.status, Status::Open, "{t:?}");
        assert_eq!(t.channel, Channel::Phone, "{t:?}");
        assert_eq!(t.zipcode.as_deref(), Some("94103"), "{t:?}");
        assert_eq!(t.phone.as_deref(), Some("+15550001111"), "{t:?}");
        assert_eq!(t.language.as_deref(), Some("en"), "{t:?}");
        let call_id = t.call_id.as_deref().expect("call_id");
        assert!(by_call.insert(call_id.to_owned()), "one ticket per call");
        if let Some(h) = ours.get(call_id) {
            assert!(!h.emergency, "no ticket from the 911 caller");
        }
    }
    let ids: HashSet<u64> = tickets.iter().map(|t| t.service_request_id).collect();
    for h in heard {
        if let Some(n) = h.ticket_number() {
            assert!(
                ids.contains(&n),
                "ticket {n} was read to a caller and is gone"
            );
        }
    }
    let audits: BTreeMap<i64, EmergencyAuditRow> = store
        .emergency_audits(10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a))
        .collect();
    for h in heard.iter().filter(|h| h.heard_911_announcement()) {
        assert!(
            audits.values().any(|a| a.call_id == h.call_id),
            "the 911 caller heard the announcement, so the audit row was committed"
        );
    }
    for (id, before) in earlier_audits {
        let now = audits
            .get(id)
            .unwrap_or_else(|| panic!("audit row {id} lost"));
        assert_eq!(
            (&now.at, &now.call_id, &now.menu_path, &now.method),
            (
                &before.at,
                &before.call_id,
                &before.menu_path,
                &before.method
            ),
            "audit row {id} changed"
        );
    }
    store.close().await;
    (tickets.len(), audits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_filing_loses_no_ticket_read_back_and_no_audit_row() {
    let setup = Setup::new();
    let ear = Arc::new(PromptEar::new(
        "en",
        &[
            "ticket_filed",
            "emergency_announce",
            "connecting_911",
            "digit_0",
            "digit_1",
            "digit_2",
            "digit_3",
            "digit_4",
            "digit_5",
            "digit_6",
            "digit_7",
            "digit_8",
            "digit_9",
        ],
        Codec::Pcmu,
    ));
    let mut all_heard: Vec<Heard> = Vec::new();
    let mut audits = BTreeMap::new();
    let mut figures = Vec::new();
    for kill_ms in KILL_AFTER_MS {
        let mut server = setup.start().await;
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..CALLERS {
            callers.spawn(caller(
                server.sip,
                STAGGER * i as u32,
                i == EMERGENCY,
                ear.clone(),
            ));
        }
        // The moment of the crash is what each round varies: not a wait.
        tokio::time::sleep(Duration::from_millis(kill_ms)).await;
        server.child.kill().expect("SIGKILL");
        server.child.wait().unwrap();
        let mut round = Vec::new();
        while let Some(h) = callers.join_next().await {
            round.push(h.expect("caller task"));
        }
        let numbers = round.iter().filter(|h| h.ticket_number().is_some()).count();
        let announced = round.iter().filter(|h| h.heard_911_announcement()).count();
        all_heard.extend(round);
        let (tickets, now) = check_database(&setup.db, &all_heard, &audits).await;
        figures.push(format!(
            "kill at {kill_ms} ms: {numbers} numbers read back, {announced} 911 announced, \
             {tickets} tickets and {} audit rows after restart",
            now.len()
        ));
        audits = now;
    }
    // A last restart serves again, and the admin CLI reads the same tickets.
    let server = setup.start().await;
    drop(server);
    let out = Command::new(env!("CARGO_BIN_EXE_ivr311"))
        .args(["tickets", "list", "--json", "--limit", "100000"])
        .args(["--db", &setup.db.display().to_string()])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let (tickets, _) = check_database(&setup.db, &all_heard, &audits).await;
    assert_eq!(listed.len(), tickets);
    println!("crash: {}", figures.join("; "));
    assert!(
        all_heard.iter().any(|h| h.ticket_number().is_some()),
        "some rounds must get as far as reading a number back"
    );
    assert!(
        all_heard.iter().any(|h| h.heard_911_announcement()),
        "some rounds must get as far as the 911 announcement"
    );
}
