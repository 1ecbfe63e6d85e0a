//! Smoke test of the load harness (`ivr311-load`): a few seconds, ~10 calls per script against
//! the real server on loopback, asserting only that the harness works: every call succeeds,
//! every key that should get a response got one, and the pothole callers filed tickets. No
//! timing assertions (performance figures belong in BENCHMARKS.md).
//!
//! The server runs in this test's process, started through the `ivr311` library from its own
//! command-line flags and config YAML, so it is always built from the same sources as the
//! generator (a server binary found in the target directory could be stale or missing).
#![cfg(target_os = "linux")]

use clap::Parser;
use ivr311::config::{FileConfig, ServeArgs};
use ivr311::server::RunningServer;
use serde_json::Value;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The workspace root: the server's menus and prompts.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the generator lives inside the workspace")
        .to_owned()
}

/// `ivr311 serve`'s flags, parsed as the server's own command line parses them.
#[derive(Parser)]
struct Serve {
    #[command(flatten)]
    args: ServeArgs,
}

/// A 200-port RTP range of its own for each server this test binary starts (they run side by
/// side; the server's pool skips ports another process holds).
fn rtp_range() -> String {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(u16::MAX);
    let _ = NEXT.compare_exchange(
        u16::MAX,
        rand::random::<u16>() % 200,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let slot = NEXT.fetch_add(1, Ordering::Relaxed) % 200;
    let lo = 20000 + slot * 200;
    format!("{lo}-{}", lo + 198)
}

/// The real server on loopback, port 0, with the shipped menu and prompts, a database and
/// recordings directory of its own, and the config YAML `limits` (more keys under `limits:`,
/// indented) and `extra` (more top-level keys).
struct Server {
    srv: RunningServer,
    dir: PathBuf,
}

impl Server {
    async fn start(limits: &str, extra: &str) -> Server {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let dir = std::env::temp_dir().join(format!("ivr311-loadgen-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let (menu, prompts) = (repo().join("menus/311.yaml"), repo().join("prompts"));
        let (db, rtp_ports) = (dir.join("tickets.db"), rtp_range());
        let o = OsStr::new;
        let flags = Serve::try_parse_from([
            o("serve"),
            o("--sip"),
            o("127.0.0.1:0"),
            o("--http"),
            o("127.0.0.1:0"),
            o("--menu"),
            menu.as_os_str(),
            o("--prompts"),
            prompts.as_os_str(),
            o("--db"),
            db.as_os_str(),
            o("--rtp-ports"),
            o(&rtp_ports),
        ])
        .unwrap_or_else(|e| panic!("serve flags: {e}"));
        let yaml = format!(
            "storage:\n  recordings_dir: {:?}\nlimits:\n  drain_seconds: 0\n{limits}{extra}",
            dir.join("recordings")
        );
        let file = FileConfig::parse(Path::new("loadgen-test.yaml"), &yaml)
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        // A Monday at 10:00 in New York: the shipped menu's call centre is open.
        let open =
            ivr311::menu::schedule::WallClock::starting_at("2026-12-07T15:00:00Z".parse().unwrap());
        let srv = ivr311::server::start_with_clock(&flags.args, file, open)
            .await
            .expect("server starts");
        Server { srv, dir }
    }

    async fn stop(self) {
        self.srv.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl std::ops::Deref for Server {
    type Target = RunningServer;
    fn deref(&self) -> &RunningServer {
        &self.srv
    }
}

/// Run the generator against `target` with `extra` flags and return its JSON report.
async fn run_loadgen(target: std::net::SocketAddr, extra: &[&str]) -> Value {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ivr311-load"));
    cmd.arg("--target")
        .arg(target.to_string())
        .arg("--menu")
        .arg(repo().join("menus/311.yaml"))
        .arg("--json")
        .args(extra)
        .env("RUST_LOG", "warn");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("ivr311-load runs"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || out.status.code() == Some(2),
        "ivr311-load failed: {}\n{stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("JSON: {e}\n{stdout}\n{stderr}"))
}

fn assert_every_call_succeeded(report: &Value, calls: u64) {
    let total = &report["total"];
    let c = &total["calls"];
    assert_eq!(c["placed"], calls, "{c}");
    assert_eq!(c["ok"], calls, "every call succeeded: {c}");
    assert_eq!(c["failed"], 0, "{c}");
    assert!(
        total["rtp"]["received"].as_u64().unwrap() > 100 * calls,
        "server audio arrived for every call: {}",
        total["rtp"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_reference_calls_all_complete_and_both_digits_get_responses() {
    let srv = Server::start("", "").await;
    let report = run_loadgen(
        srv.sip_addr,
        &["--script", "asterisk", "--calls", "10", "--rate", "5"],
    )
    .await;
    assert_every_call_succeeded(&report, 10);
    let d = &report["total"]["digits"];
    assert_eq!(d["sent"], 20, "two distinct key presses per call: {d}");
    assert_eq!(d["unanswered"], 0, "{d}");
    assert_eq!(
        d["press_to_response"]["count"], 20,
        "each press started a new prompt: {d}"
    );
    // The caller hung up every call; the server did not.
    assert_eq!(report["total"]["calls"]["server_byes_answered"], 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pothole_callers_walk_the_menu_and_file_tickets() {
    let srv = Server::start("", "").await;
    let report = run_loadgen(
        srv.sip_addr,
        &[
            "--script",
            "pothole",
            "--calls",
            "8",
            "--rate",
            "4",
            "--listen-ms",
            "1500",
        ],
    )
    .await;
    assert_eq!(report["keys"], "111194103#", "keys read from the menu");
    assert_every_call_succeeded(&report, 8);
    let d = &report["total"]["digits"];
    assert_eq!(d["sent"], 8 * 10, "{d}");
    assert_eq!(d["unanswered"], 0, "{d}");
    assert_eq!(d["press_to_response"]["count"], 8 * 6, "{d}");

    let tickets = srv.tickets.list(&Default::default()).await.unwrap();
    assert_eq!(tickets.len(), 8, "one ticket per caller");
    for t in &tickets {
        assert_eq!(t.service_code, "pothole");
        assert_eq!(t.zipcode.as_deref(), Some("94103"));
        assert!(
            t.call_id
                .as_deref()
                .is_some_and(|c| c.ends_with("@ivr311-load")),
            "{:?}",
            t.call_id
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_callers_are_bridged_to_the_generators_agents_and_talk_both_ways() {
    // Four agents load-0001..load-0004 with the generator's default password, one queue.
    let agents: String = (1..=4)
        .map(|n| format!("  - {{id: load-{n:04}, password: load-agent-pw}}\n"))
        .collect();
    let srv = Server::start(
        // Every REGISTER comes from one address.
        "  options_per_second: 0\n",
        &format!(
            "agents:\n{agents}queues:\n  - name: general\n    ring_timeout_seconds: 10\n    \
             no_answer_pause_seconds: 5\n    wrap_up_seconds: 0\n"
        ),
    )
    .await;
    let report = run_loadgen(
        srv.sip_addr,
        &[
            "--script",
            "operator",
            "--agents",
            "4",
            "--concurrent",
            "4",
            "--duration",
            "3",
            "--talk-seconds",
            "2",
        ],
    )
    .await;
    assert_eq!(report["keys"], "110", "keys read from the menu");
    let total = &report["total"];
    let c = &total["calls"];
    let placed = c["placed"].as_u64().unwrap();
    assert!(placed >= 4, "{c}");
    assert_eq!(c["ok"], placed, "every call succeeded: {c}");
    assert_eq!(c["failed"], 0, "{c}");
    let b = &total["bridge"];
    assert_eq!(b["bridged"], placed, "every caller heard an operator: {b}");
    assert_eq!(b["not_bridged"], 0, "{b}");
    let a = &b["agents"];
    assert_eq!(a["registrations"], 4, "{a}");
    assert_eq!(a["register_failures"], 0, "{a}");
    assert_eq!(a["offers_answered"], placed, "{a}");
    assert_eq!(
        a["calls_ok"], placed,
        "the server hung up every agent leg: {a}"
    );
    assert_eq!(a["failed"], 0, "{a}");
    assert_eq!(a["offers_to_busy_agent"], 0, "{a}");
    // Audio both ways through the server, marked by its sender (passed through untranscoded).
    for (end, transit) in [
        ("at_caller", "transit_from_agent"),
        ("at_agent", "transit_from_caller"),
    ] {
        let e = &b[end];
        assert!(e["received"].as_u64().unwrap() > 50 * placed, "{end}: {e}");
        assert!(e[transit]["count"].as_u64().unwrap() > 0, "{end}: {e}");
        assert!(
            e["pacing_deviation"]["count"].as_u64().unwrap() > 0,
            "{end}: {e}"
        );
    }
    // Everything the agents got was the callers' marked audio or their key into the queue
    // (a caller may still get a last prompt packet the media clock sent as the bridge began).
    assert_eq!(b["at_agent"]["unmarked"], 0, "{b}");
    assert_eq!(
        b["press_to_agent_audio"]["count"], placed,
        "time to the operator measured for every call: {b}"
    );
    srv.stop().await;
}
