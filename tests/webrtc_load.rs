//! Browser operator bridges under load (BENCHMARKS.md, "Browser operator bridges"). N callers
//! (test UAs streaming G.711 at 20 ms) press 0 and are each bridged to an operator: first N
//! desk phones (plain RTP over UDP), then, on a fresh server, N browsers (SIP over WebSocket,
//! webrtc-rs peers: ICE, DTLS client, SRTP). With all N bridged, it measures over a window the
//! CPU of the server's media clock threads (`ivr311-media-*`, where the relay and its SRTP
//! work run) and of the whole process (server and generator share it), and at the operators
//! the relay jitter of the caller's stream: |Δarrival − Δtimestamp| per packet, which holds
//! the generator's own sending jitter too (an upper bound on what the server added).
//!
//! Not part of the normal test run (ignored); run it alone:
//!
//!   IVR311_BRIDGES=100 IVR311_WINDOW_SECONDS=20 \
//!     cargo test --test webrtc_load -- --ignored --nocapture

mod common;
#[path = "common/webrtc_peer.rs"]
mod webrtc_peer;

use common::*;
use ivr311::config::parse_port_range;
use ivr311::media::g711::Codec;
use ivr311::media::rtp::{self, RtpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use webrtc_peer::*;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of this process's threads whose name starts with `prefix`, or of
/// the whole process with `None`.
fn cpu(prefix: Option<&str>) -> Duration {
    let ticks = |stat: &str| -> u64 {
        // After the ")" closing the name: state is field 3; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    let hz = 100; // USER_HZ on Linux
    let total = match prefix {
        None => ticks(&std::fs::read_to_string("/proc/self/stat").unwrap()),
        Some(p) => std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.trim().starts_with(p))
            })
            .map(|e| ticks(&std::fs::read_to_string(e.path().join("stat")).unwrap_or_default()))
            .sum(),
    };
    Duration::from_millis(total * 1000 / hz)
}

fn percentile(v: &mut [f32], p: f64) -> f32 {
    if v.is_empty() {
        return f32::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One operator's jitter samples, shared with the test.
type JitterRecord = Arc<Mutex<Vec<f32>>>;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    DeskPhone,
    Browser,
}

struct Outcome {
    bridged: usize,
    clock_cpu: f64,
    process_cpu: f64,
    jitter: Vec<f32>,
    tone_share: f64,
}

/// A desk phone's media after it answered: a 1 kHz tone to the server every 20 ms, and the
/// jitter of what it receives.
async fn desk_phone_media(
    agent: TestAgent,
    to: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    jitter: Arc<Mutex<Vec<f32>>>,
) {
    let mut payload = [0u8; 160];
    Codec::Pcmu.encode(&tone(1000.0), &mut payload);
    let mut s = RtpStream::new();
    let mut out = [0u8; 200];
    let mut buf = [0u8; 2048];
    let mut next = tokio::time::Instant::now();
    let mut last: Option<(Instant, u32)> = None;
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                next += Duration::from_millis(20);
                let n = s.write(0, &payload, 160, &mut out);
                let _ = agent.rtp.send_to(&out[..n], to).await;
            }
            r = agent.rtp.recv_from(&mut buf) => {
                let Ok((n, _)) = r else { return };
                let at = Instant::now();
                if let Ok(p) = rtp::parse(&buf[..n]) {
                    if let Some((t0, ts0)) = last {
                        let sent = p.timestamp.wrapping_sub(ts0) as i32 as f32 / 8.0;
                        let got = at.duration_since(t0).as_secs_f32() * 1000.0;
                        jitter.lock().unwrap().push((got - sent).abs());
                    }
                    last = Some((at, p.timestamp));
                }
            }
        }
    }
}

async fn run(kind: Kind, n: usize, window: Duration) -> Outcome {
    let ids: Vec<String> = (1..=n).map(|i| format!("{}", 5000 + i)).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut file = agents_config(&id_refs, 60, 0);
    file.limits.max_calls_per_source = 0;
    file.limits.invites_per_second = 0;
    file.limits.options_per_second = 0;
    file.limits.max_tcp_connections_per_source = 0;
    file.limits.max_tcp_connections = 4 * n + 64;
    let mut args = serve_args();
    args.rtp_ports = parse_port_range("30000-39999").unwrap();
    let srv = start_server_with(args, file).await;
    let stop = Arc::new(AtomicBool::new(false));
    let measure = Arc::new(AtomicBool::new(false));
    let jitter = Arc::new(Mutex::new(Vec::new()));
    // Each browser's own record, so the window's start can clear them all.
    let browser_jitter: Arc<Mutex<Vec<JitterRecord>>> = Arc::default();

    // The operators log in and answer whatever they are offered.
    let mut agents = Vec::new();
    for id in &ids {
        let (id, stop, jitter) = (id.clone(), stop.clone(), jitter.clone());
        let browser_jitter = browser_jitter.clone();
        let (http, sip) = (srv.http_addr, srv.sip_addr);
        agents.push(tokio::spawn(async move {
            match kind {
                Kind::DeskPhone => {
                    let agent = TestAgent::login(sip, &id).await;
                    let inv = agent.request("INVITE", Duration::from_secs(300)).await;
                    let to = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
                    agent.reply(&inv, 200, "OK", Some(agent.answer_sdp())).await;
                    desk_phone_media(agent, to, stop, jitter).await;
                }
                Kind::Browser => {
                    let mut agent = WsAgent::login(http, sip, &id).await;
                    let inv = agent.request("INVITE", Duration::from_secs(300)).await;
                    let offer = String::from_utf8(inv.body.to_vec()).unwrap();
                    let (browser, answer) = Browser::answer(&offer).await;
                    browser_jitter
                        .lock()
                        .unwrap()
                        .push(browser.jitter_ms.clone());
                    agent.reply(&inv, 200, "OK", Some(answer)).await;
                    while !stop.load(Ordering::Relaxed) {
                        // Keep the WebSocket read (the server's requests are answered by
                        // nobody; none come while the call is up).
                        let _ = agent.recv(Duration::from_millis(200)).await;
                    }
                    drop(browser);
                }
            }
        }));
    }
    until_logged_in(srv.http_addr, n).await;

    // The callers, 20 a second, each streaming and listening until the end.
    let heard_tone = Arc::new(Mutex::new((0usize, 0usize)));
    let mut callers = Vec::new();
    for i in 0..n {
        let (stop, measure, heard_tone) = (stop.clone(), measure.clone(), heard_tone.clone());
        let sip = srv.sip_addr;
        callers.push(tokio::spawn(async move {
            let mut ua = caller_pressing(sip, "110").await;
            while !measure.load(Ordering::Relaxed) {
                ua.listen(Duration::from_millis(100)).await;
            }
            // One stretch of listening for the whole window: its 20 ms sending grid is not
            // restarted (the jitter measured at the operator is this stream's).
            let heard = ua.listen(window).await;
            {
                let mut h = heard_tone.lock().unwrap();
                h.0 += tone_frames(&heard, 1000.0);
                h.1 += heard.len();
            }
            while !stop.load(Ordering::Relaxed) {
                ua.listen(Duration::from_millis(100)).await;
            }
            let _ = ua.bye().await;
        }));
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let bridged = until_on_call(srv.http_addr, n, Duration::from_secs(120)).await;
    // Let every stream settle, then measure over the window (the callers' listening stretch,
    // with a margin each side so that only steady streams are counted).
    tokio::time::sleep(Duration::from_secs(2)).await;
    measure.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    jitter.lock().unwrap().clear();
    for j in browser_jitter.lock().unwrap().iter() {
        j.lock().unwrap().clear();
    }
    let (c0, p0, t0) = (cpu(Some("ivr311-media")), cpu(None), Instant::now());
    tokio::time::sleep(window - Duration::from_secs(1)).await;
    let (c1, p1, elapsed) = (cpu(Some("ivr311-media")), cpu(None), t0.elapsed());
    for j in browser_jitter.lock().unwrap().iter() {
        let j = std::mem::take(&mut *j.lock().unwrap());
        jitter.lock().unwrap().extend(j);
    }
    let jitter_window = std::mem::take(&mut *jitter.lock().unwrap());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let on_call_at_end = on_call(srv.http_addr).await;
    stop.store(true, Ordering::Relaxed);
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
    }
    for c in callers {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    assert_eq!(
        on_call_at_end, bridged,
        "{kind:?}: bridges were lost during the window"
    );
    let (tone, frames) = *heard_tone.lock().unwrap();
    let jitter = jitter_window;
    Outcome {
        bridged,
        clock_cpu: (c1 - c0).as_secs_f64() / elapsed.as_secs_f64(),
        process_cpu: (p1 - p0).as_secs_f64() / elapsed.as_secs_f64(),
        jitter,
        tone_share: tone as f64 / frames.max(1) as f64,
    }
}

async fn figures(http_addr: std::net::SocketAddr) -> serde_json::Value {
    let (_, body) = http(http_addr, "GET", "/admin/queues", &[], b"").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .into_iter()
        .flatten()
        .find(|q| q["name"] == "general")
        .cloned()
        .unwrap_or_default()
}

async fn on_call(http_addr: std::net::SocketAddr) -> usize {
    figures(http_addr).await["agents"]["on_call"]
        .as_u64()
        .unwrap_or(0) as usize
}

async fn until_logged_in(http_addr: std::net::SocketAddr, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let f = figures(http_addr).await;
        if f["agents"]["available"].as_u64() == Some(n as u64) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all {n} agents logged in: {f}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn until_on_call(http_addr: std::net::SocketAddr, n: usize, within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now_on = on_call(http_addr).await;
        if now_on == n {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {now_on} of {n} bridged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run alone (see the module docs)"]
async fn browser_bridges_against_desk_phone_bridges() {
    let n = env_or("IVR311_BRIDGES", 50) as usize;
    let window = Duration::from_secs(env_or("IVR311_WINDOW_SECONDS", 20).max(3));
    let mut rows = Vec::new();
    for kind in [Kind::DeskPhone, Kind::Browser] {
        let mut o = run(kind, n, window).await;
        let p50 = percentile(&mut o.jitter, 0.50);
        let p99 = percentile(&mut o.jitter, 0.99);
        let p999 = percentile(&mut o.jitter, 0.999);
        let row = format!(
            "| {kind:?} | {} | {:.1}% / {:.3}% | {:.1}% | {p50:.2} / {p99:.2} / {p999:.2} ms ({} packets) | {:.0}% |",
            o.bridged,
            o.clock_cpu * 100.0,
            o.clock_cpu * 100.0 / o.bridged as f64,
            o.process_cpu * 100.0,
            o.jitter.len(),
            o.tone_share * 100.0,
        );
        eprintln!("{row}");
        rows.push(row);
        assert!(
            o.tone_share > 0.9,
            "{kind:?}: callers heard the operators' tone in {:.0}% of frames",
            o.tone_share * 100.0
        );
    }
    eprintln!(
        "\n| operators | bridges | media clock CPU (of a core) / per bridge | whole process (server + generator) | relay jitter at the operator p50 / p99 / p99.9 | callers' frames that are the operator's tone |\n| --- | --- | --- | --- | --- | --- |"
    );
    for r in rows {
        eprintln!("{r}");
    }
}
