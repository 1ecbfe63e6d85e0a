//! Soak: thousands of short calls against one in-process server, then nothing has grown: no
//! call in the admin view, every RTP port back in the pool, the dialog and transaction tables
//! back to empty, the tokio task count back to idle, and resident memory within a bound.
//!
//! Each call: INVITE, hear the language menu, press 1, hear the 911 screening prompt, BYE.
//! The figures are printed (`cargo test --test soak -- --nocapture`) for the README.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::media::g711::Codec;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Calls in the measured run.
const CALLS: usize = 2000;
/// Calls in progress at once.
const CONCURRENCY: usize = 50;
/// Calls before the baseline is taken (allocator arenas, prompt caches, socket buffers).
const WARM_UP: usize = 200;
/// Longest a transaction outlives its call: 64·T1 (timer J of the BYE, timer L of the
/// INVITE), plus a margin for a loaded machine.
const TXN_LINGER: Duration = Duration::from_secs(45);
/// Resident memory may grow by this much over the measured run. Growth is expected: every
/// call's INVITE and BYE transactions live on for 64·T1 = 32 s after it, so at the end of the
/// run the UA holds about two per call (thousands, with their requests), and the allocator
/// keeps those pages after they are freed. A leak of 32 KiB per call would pass 62 MiB.
const RSS_BOUND_KIB: u64 = 64 * 1024;

/// One short call; `Err` says what the caller missed.
async fn short_call(sip: std::net::SocketAddr, ear: &PromptEar) -> Result<(), String> {
    let mut ua = TestUa::udp(sip).await;
    let r = ua.call("0 101").await;
    if r.code != 200 {
        return Err(format!("INVITE got {}", r.code));
    }
    let heard = ua.listen(Duration::from_millis(250)).await;
    if !prompts_heard(ear, &heard).contains(&"language_menu".to_owned()) {
        return Err("no greeting".into());
    }
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(250)).await;
    if !prompts_heard(ear, &heard).contains(&"screening".to_owned()) {
        return Err(format!(
            "key 1 not acted on: heard {:?}",
            prompts_heard(ear, &heard)
        ));
    }
    ua.bye().await;
    Ok(())
}

/// `calls` short calls, `CONCURRENCY` at a time; returns the failures.
async fn run_calls(sip: std::net::SocketAddr, ear: &Arc<PromptEar>, calls: usize) -> Vec<String> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..CONCURRENCY {
        let ear = ear.clone();
        let n = calls / CONCURRENCY + usize::from(w < calls % CONCURRENCY);
        set.spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..n {
                if let Err(e) = short_call(sip, &ear).await {
                    failures.push(e);
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = set.join_next().await {
        failures.extend(r.expect("caller task"));
    }
    failures
}

/// Wait until the server holds nothing for finished calls.
async fn settle(http: std::net::SocketAddr, ports_idle: f64, txns: Option<Duration>) {
    let live = settle_metric(http, "ivr311_live_calls", 0.0, Duration::from_secs(10)).await;
    assert_eq!(live, 0.0, "calls left in the registry");
    assert!(admin_calls(http).await.is_empty(), "admin view not empty");
    let ports = settle_metric(
        http,
        "ivr311_rtp_ports_free",
        ports_idle,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(ports, ports_idle, "RTP ports not all back in the pool");
    let dialogs = settle_metric(http, "ivr311_sip_dialogs", 0.0, Duration::from_secs(5)).await;
    assert_eq!(dialogs, 0.0, "dialogs left");
    if let Some(txns) = txns {
        let t = settle_metric(http, "ivr311_sip_transactions", 0.0, txns).await;
        assert_eq!(t, 0.0, "transactions left after 64·T1");
    }
}

/// Tasks alive in this runtime once it is quiet (HTTP connections of the probes closed).
async fn idle_tasks(at_most: usize) -> usize {
    let m = tokio::runtime::Handle::current().metrics();
    for _ in 0..40 {
        if m.num_alive_tasks() <= at_most {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m.num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_short_calls_leave_nothing_behind() {
    // Every call comes from this one address, 50 at a time: the per-source call limits are
    // off, as for a trunk.
    let mut file = FileConfig::default();
    file.limits.max_calls_per_source = 0;
    file.limits.invites_per_second = 0;
    let srv = start_server(file).await;
    let http = srv.http_addr;
    let ear = Arc::new(PromptEar::new(
        "en",
        &["language_menu", "screening", "main_menu"],
        Codec::Pcmu,
    ));
    let ports_idle = metric(http, "ivr311_rtp_ports_free").await;
    let tasks_start = idle_tasks(usize::MAX).await;

    let failures = run_calls(srv.sip_addr, &ear, WARM_UP).await;
    assert!(failures.is_empty(), "warm-up: {failures:?}");
    // Transactions of the warm-up still linger (64·T1): not waited for here.
    settle(http, ports_idle, None).await;
    let tasks_before = idle_tasks(tasks_start).await;
    let rss_before = rss_kib();

    let started = Instant::now();
    let failures = run_calls(srv.sip_addr, &ear, CALLS).await;
    let secs = started.elapsed().as_secs_f64();
    let rss_peak = rss_kib();
    assert!(
        failures.is_empty(),
        "{} of {CALLS} calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    settle(http, ports_idle, Some(TXN_LINGER)).await;
    let tasks_after = idle_tasks(tasks_before).await;
    let rss_after = rss_kib();
    let completed = health(http).await["calls_completed"].as_u64().unwrap_or(0);
    println!(
        "soak: {CALLS} calls ({CONCURRENCY} at a time) in {secs:.1} s after {WARM_UP} warm-up; \
         completed {completed}; RSS {rss_before} KiB -> {rss_peak} KiB at the end of the run -> {rss_after} KiB \
         once idle ({:+} KiB); \
         tokio tasks {tasks_before} -> {tasks_after} (at start {tasks_start}); \
         RTP ports free {ports_idle}; dialogs 0; transactions 0",
        rss_after as i64 - rss_before as i64
    );
    assert_eq!(completed, (WARM_UP + CALLS) as u64, "every call completed");
    assert!(
        tasks_after <= tasks_before,
        "tokio tasks grew: {tasks_before} -> {tasks_after}"
    );
    assert!(
        rss_after.saturating_sub(rss_before) <= RSS_BOUND_KIB,
        "RSS grew {rss_before} -> {rss_after} KiB"
    );
    srv.shutdown().await;
}
