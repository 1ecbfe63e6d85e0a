//! The command line, and the run it drives: the plan of steps, the worker and agent threads,
//! the per-step reports, `--spawn-server`.

use crate::procfs::{self, ProcSample};
use crate::script::Script;
use crate::stats::{Stats, StepReport, Targets};
use crate::worker::{self, Shared, Worker};
use crate::{agents, net, spawn};
use clap::{Parser, ValueEnum};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScriptName {
    /// Digit 1 at 1.5 s, digit 1 again at 3.5 s, hang up at 8 s (the Asterisk reference call).
    Asterisk,
    /// File a ticket (`--service`, default pothole) along the menu's keys, then hang up.
    Pothole,
    /// Walk the menu's keys to the operator queue (`--queue`), wait for one of our agents
    /// (`--agents`) to be bridged in, talk `--talk-seconds` both ways, hang up.
    Operator,
}

#[derive(Parser, Debug)]
#[command(
    name = "ivr311-load",
    about = "Full-media SIP IVR load generator: places calls, streams G.711, presses RFC 4733 keys, measures the server",
    after_help = "Operators (--agents N, --script operator): the generator registers N phones load-0001..load-NNNN (password --agent-password) and answers every call the server offers them. With --spawn-server the server's config gets those agents, a queue `general` (longest_idle, wrap_up_seconds 0, ring_timeout_seconds 10, large max_length/max_wait_seconds), limits.options_per_second 0, limits.max_calls 10000, limits.max_calls_per_source 0, limits.invites_per_second 0 and --rtp-ports 2000-9999 (two ports per bridge, clear of the default 10000-20000 other servers on this machine may hold). Against another server (--target/--server-pid) its config needs the same: agents `{id: load-0001, password: <--agent-password>}`... for every agent, a queue named as --queue reachable from the menu, limits.options_per_second: 0 (all REGISTERs come from one address), max_calls_per_source: 0 and invites_per_second: 0 (so do all calls), max_calls and --rtp-ports for two ports per bridge; its SIP replies must come from --target (the agents answer there)."
)]
struct Args {
    /// SIP server (UDP).
    #[arg(long, default_value = "127.0.0.1:5060")]
    target: SocketAddr,
    /// What each caller does.
    #[arg(long, value_enum, default_value = "asterisk")]
    script: ScriptName,
    /// Menu file the pothole script reads its keys from (and `--spawn-server` serves).
    #[arg(long, default_value = "menus/311.yaml")]
    menu: PathBuf,
    /// Ticket service the pothole script files.
    #[arg(long, default_value = "pothole")]
    service: String,
    /// Pothole script: ms to listen to the ticket read-back before hanging up.
    #[arg(long, default_value_t = 5000)]
    listen_ms: u32,
    /// Hang up this many ms after the answer instead of where the script says.
    #[arg(long)]
    hangup_at_ms: Option<u32>,
    /// Place this many calls (with --rate).
    #[arg(long)]
    calls: Option<u64>,
    /// New calls per second (with --calls: the offered rate; with --concurrent/--ramp: a cap,
    /// default 400).
    #[arg(long)]
    rate: Option<f64>,
    /// Keep this many calls up, replacing each one that ends, for --duration seconds.
    #[arg(long)]
    concurrent: Option<u64>,
    /// Concurrency steps, e.g. 500,1000,2000,3000; stops at the first step that breaks a target.
    #[arg(long, value_delimiter = ',')]
    ramp: Vec<u64>,
    /// Length of each ramp step, and of each report while --calls runs.
    #[arg(long, default_value_t = 30.0)]
    step_seconds: f64,
    /// Length of a --concurrent run (default: --step-seconds).
    #[arg(long)]
    duration: Option<f64>,
    /// Worker threads (each with its own SIP socket and share of the calls).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Longest wait for calls in progress at the end (timers B/F are 32 s).
    #[arg(long, default_value_t = 45.0)]
    drain_seconds: f64,
    /// Server process to sample from /proc each step.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Start the server binary with a temporary database, free ports and --menu, and stop it
    /// at the end (overrides --target).
    #[arg(long)]
    spawn_server: bool,
    /// The server binary for --spawn-server (default: `ivr311` next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Prompts directory for --spawn-server.
    #[arg(long, default_value = "prompts")]
    prompts: PathBuf,
    /// Run every ramp step even after one broke a target (the highest step that held is still
    /// the last one before the first break).
    #[arg(long)]
    keep_going: bool,
    /// Print one JSON document to stdout (the tables go to stderr).
    #[arg(long)]
    json: bool,
    /// Operator phones to register and answer with (ids load-0001...).
    #[arg(long, default_value_t = 0)]
    agents: usize,
    /// The agents' digest password.
    #[arg(long, default_value = "load-agent-pw")]
    agent_password: String,
    /// Threads for the agents (each with its own SIP socket and share of the agents).
    #[arg(long, default_value_t = 1)]
    agent_threads: usize,
    /// Operator script: the queue to reach (its key path comes from --menu).
    #[arg(long, default_value = "general")]
    queue: String,
    /// Operator script: seconds to talk once the operator is heard.
    #[arg(long, default_value_t = 10.0)]
    talk_seconds: f64,
    /// Operator script: a caller not hearing an operator this long after the key into the
    /// queue hangs up and counts as not bridged.
    #[arg(long, default_value_t = 20.0)]
    bridge_timeout_seconds: f64,
    /// REGISTERs per second the agents send in all.
    #[arg(long, default_value_t = 400.0)]
    register_rate: f64,
    /// Registration expiry the agents ask for, seconds (they refresh at 80 % of it).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u32).range(60..=7200))]
    register_expires: u32,
    /// Longest wait for every agent to be registered before the first call.
    #[arg(long, default_value_t = 30.0)]
    register_wait_seconds: f64,
    /// Run the generator's call and agent threads at this nice value (e.g. 10), after the
    /// server was spawned at ours: on a shared machine the server then gets a CPU before the
    /// generator. Receive stamps are taken by the kernel when the server sends, and the
    /// relay-added jitter (|Δrx−Δtx|) discounts our late sends, so the figures stay the
    /// server's.
    #[arg(long, default_value_t = 0)]
    generator_nice: i32,
    /// Run the generator's call and agent threads at real-time priority (SCHED_FIFO 1, below
    /// the media clock's 10; needs root or CAP_SYS_NICE). On two cores shared with the server
    /// the phones then keep their 20 ms schedule, so bridge pacing at the ends measures the
    /// server's relay rather than our own late sends; but they also go ahead of everything at
    /// normal priority, the server's SIP threads included (see BENCHMARKS.md, "Bridged operator calls").
    #[arg(long)]
    generator_realtime: bool,
    /// --spawn-server: run the server's media clock at real-time priority
    /// (`media: {realtime: true}`, SCHED_FIFO; needs root or CAP_SYS_NICE), as `asterisk -p`.
    #[arg(long)]
    server_realtime: bool,
    /// --spawn-server: the server's --rtp-ports (default with --agents: 2000-9999, 4000 even
    /// ports, clear of the default 10000-20000 and of the ephemeral ports our sockets use).
    #[arg(long)]
    rtp_ports: Option<String>,
}

pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("ivr311-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A step of the plan.
struct Plan {
    label: String,
    seconds: f64,
    /// Total concurrency target (None: rate mode, no cap).
    concurrent: Option<u64>,
    /// Check the targets and stop the ramp when broken.
    check: bool,
}

fn build_script(args: &Args) -> anyhow::Result<Script> {
    let s = match args.script {
        ScriptName::Asterisk => Script::asterisk(),
        ScriptName::Pothole | ScriptName::Operator => {
            let text = std::fs::read_to_string(&args.menu)
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.menu.display()))?;
            let menu = ivr311::menu::schema::parse(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}:{}: {}",
                    args.menu.display(),
                    e.line,
                    e.column,
                    e.message
                )
            })?;
            match args.script {
                ScriptName::Operator => Script::operator(
                    &menu,
                    &args.queue,
                    (args.talk_seconds * 1000.0) as u32,
                    (args.bridge_timeout_seconds * 1000.0) as u32,
                )?,
                _ => Script::pothole(&menu, &args.service, args.listen_ms)?,
            }
        }
    };
    let s = match args.hangup_at_ms {
        Some(ms) => s.with_hangup_at(ms),
        None => s,
    };
    s.check()?;
    Ok(s)
}

/// Returns whether every checked step held.
fn run(mut args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    let script = Arc::new(build_script(&args)?);
    let nofile = net::raise_nofile();
    anyhow::ensure!(
        !script.bridges() || args.agents > 0,
        "--script operator needs --agents N (the operators it talks to)"
    );
    anyhow::ensure!(
        args.agent_threads >= 1,
        "--agent-threads must be at least 1"
    );
    let mut server = None;
    if args.spawn_server {
        let (limits, extra) = spawned_config(&args);
        let rtp_ports = args
            .rtp_ports
            .clone()
            .or_else(|| (args.agents > 0).then(|| "2000-9999".to_string()));
        let s = spawn::Server::start(
            &args.server_bin,
            &args.menu,
            &args.prompts,
            &limits,
            &extra,
            rtp_ports.as_deref(),
        )?;
        args.target = s.sip;
        args.server_pid = Some(s.pid());
        server = Some(s);
    }
    let plans = plan(&args)?;
    let calls_total = args.calls;
    let rate_total = match (args.calls, args.rate) {
        (Some(_), Some(r)) => r,
        (Some(_), None) => anyhow::bail!("--calls needs --rate"),
        (None, r) => r.unwrap_or(400.0),
    };
    let local_ip = {
        let probe = UdpSocket::bind(("0.0.0.0", 0))?;
        probe.connect(args.target)?;
        probe.local_addr()?.ip()
    };
    let out = |s: &str| {
        if args.json {
            eprint!("{s}");
        } else {
            print!("{s}");
        }
    };
    out(&format!(
        "ivr311-load: target {} script {} (keys {}, {} responses expected per call), {} thread(s), local {}, open files {}\n",
        args.target,
        script.name,
        script.keys(),
        script.responses_expected(),
        args.threads,
        local_ip,
        nofile
    ));

    let shared = Arc::new(Shared::new(args.threads));
    let nice = args.generator_nice;
    let realtime = args.generator_realtime;
    let (tx, rx) = mpsc::channel();
    let run_id: u32 = rand::random();
    let mut handles = Vec::new();
    for id in 0..args.threads {
        let share = |total: u64| {
            total / args.threads as u64 + u64::from((id as u64) < total % args.threads as u64)
        };
        let cfg = worker::Config {
            id,
            target: args.target,
            local_ip,
            script: script.clone(),
            rate: rate_total / args.threads as f64,
            calls: calls_total.map(share),
            run: run_id,
        };
        let w = Worker::new(cfg, shared.clone(), tx.clone())?;
        handles.push(
            std::thread::Builder::new()
                .name(format!("load-{id}"))
                .spawn(move || {
                    net::nice_this_thread(nice);
                    if realtime {
                        net::realtime_this_thread();
                    }
                    w.run()
                })?,
        );
    }
    let agent_threads = if args.agents > 0 {
        args.agent_threads.min(args.agents)
    } else {
        0
    };
    let mut first = 1;
    for i in 0..agent_threads {
        let count = args.agents / agent_threads + usize::from(i < args.agents % agent_threads);
        let cfg = agents::Config {
            id: args.threads + i,
            first,
            count,
            target: args.target,
            local_ip,
            password: args.agent_password.clone(),
            expires: args.register_expires,
            register_rate: args.register_rate / agent_threads as f64,
            run: run_id,
        };
        first += count;
        let w = agents::AgentWorker::new(cfg, shared.clone(), tx.clone())?;
        handles.push(
            std::thread::Builder::new()
                .name(format!("agents-{i}"))
                .spawn(move || {
                    net::nice_this_thread(nice);
                    if realtime {
                        net::realtime_this_thread();
                    }
                    w.run()
                })?,
        );
    }
    drop(tx);
    let mut register_seconds = None;
    if args.agents > 0 {
        let t = Instant::now();
        while (shared.registered.load(Ordering::Relaxed) as usize) < args.agents
            && t.elapsed().as_secs_f64() < args.register_wait_seconds
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        out(&format!(
            "ivr311-load: {} of {} agents registered in {:.2} s ({} agent thread(s))\n",
            shared.registered.load(Ordering::Relaxed),
            args.agents,
            t.elapsed().as_secs_f64(),
            agent_threads
        ));
        register_seconds = Some(t.elapsed().as_secs_f64());
    }
    let agents_registered = shared.registered.load(Ordering::Relaxed);
    let senders = args.threads + agent_threads;

    let targets = Targets::default();
    let server_pid = args.server_pid.map(|p| p.to_string());
    let sample_server = || server_pid.as_deref().and_then(procfs::sample);
    let sip_port = args.target.port();
    let server_drops = || {
        server_pid
            .as_deref()
            .and_then(|p| procfs::udp_drops(p, sip_port))
    };
    let mut reports: Vec<StepReport> = Vec::new();
    let mut step_no: u32 = 0;
    let run_start = Instant::now();
    let first_server = sample_server();
    let first_gen = procfs::sample("self");
    let first_machine = procfs::machine();
    let mut all_held = true;
    // (sum, samples) of the live-call count, sampled every 50 ms; the same for live bridges.
    let mut whole_avg = (0u64, 0u64);
    let mut whole_bridges = 0u64;
    let bridges = || shared.bridges.load(Ordering::Relaxed);
    let mut highest_held: Option<String> = None;

    let collect = |step_no: &mut u32| -> Stats {
        *step_no += 1;
        shared.step.store(*step_no, Ordering::Release);
        let mut total = Stats::default();
        for _ in 0..senders {
            if let Ok((_, _, s)) = rx.recv_timeout(Duration::from_secs(10)) {
                total.merge(&s);
            }
        }
        total
    };

    shared.placing.store(true, Ordering::Release);
    for (i, p) in plans.iter().enumerate() {
        for (id, t) in shared.threads.iter().enumerate() {
            let c = match p.concurrent {
                Some(c) => {
                    c / args.threads as u64 + u64::from((id as u64) < c % args.threads as u64)
                }
                None => u64::MAX,
            };
            t.concurrent.store(c, Ordering::Relaxed);
        }
        let (s0, g0, t0) = (sample_server(), procfs::sample("self"), Instant::now());
        let m0 = procfs::machine();
        let mut avg = (0u64, 0u64);
        let mut avg_b = 0u64;
        while t0.elapsed().as_secs_f64() < p.seconds {
            std::thread::sleep(Duration::from_millis(50));
            let live = shared.live();
            avg = (avg.0 + live, avg.1 + 1);
            whole_avg = (whole_avg.0 + live, whole_avg.1 + 1);
            avg_b += bridges();
            whole_bridges += bridges();
        }
        let stats = collect(&mut step_no);
        let seconds = t0.elapsed().as_secs_f64();
        let r = StepReport {
            index: i + 1,
            label: p.label.clone(),
            seconds,
            stats,
            live_at_end: shared.live(),
            avg_live: avg.0 as f64 / avg.1.max(1) as f64,
            server: s0.zip(sample_server()),
            generator: g0.zip(procfs::sample("self")),
            loadavg: procfs::loadavg(),
            server_idle_rss_kib: first_server.map(|s| s.rss_kib),
            server_udp_drops: server_drops(),
            machine: m0.zip(procfs::machine()),
            avg_bridges: avg_b as f64 / avg.1.max(1) as f64,
            bridges_at_end: bridges(),
        };
        out(&r.table(&targets));
        let broken = !r.broken(&targets).is_empty();
        reports.push(r);
        if p.check {
            if broken {
                all_held = false;
                if !args.keep_going {
                    break;
                }
            } else if all_held {
                highest_held = Some(p.label.clone());
            }
        }
    }

    // Drain: no new calls; let the calls in progress finish their script.
    shared.placing.store(false, Ordering::Release);
    let (s0, g0, t0) = (sample_server(), procfs::sample("self"), Instant::now());
    let m0 = procfs::machine();
    let mut avg = (0u64, 0u64);
    let mut avg_b = 0u64;
    // Callers first; then the server's BYEs to the agents (a few seconds at most).
    let mut callers_done: Option<Instant> = None;
    while (shared.live() > 0 || bridges() > 0)
        && t0.elapsed().as_secs_f64() < args.drain_seconds
        && callers_done.is_none_or(|t| t.elapsed() < Duration::from_secs(5))
    {
        std::thread::sleep(Duration::from_millis(50));
        let live = shared.live();
        if live == 0 && callers_done.is_none() {
            callers_done = Some(Instant::now());
        }
        avg = (avg.0 + live, avg.1 + 1);
        whole_avg = (whole_avg.0 + live, whole_avg.1 + 1);
        avg_b += bridges();
        whole_bridges += bridges();
    }
    if shared.live() > 0 || bridges() > 0 {
        shared.abort.store(true, Ordering::Release);
        let t = Instant::now();
        while (shared.live() > 0 || bridges() > 0) && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let stats = collect(&mut step_no);
    // Sampled while the workers still run (an exited thread's run-queue wait is not counted).
    let gen_end = procfs::sample("self");
    let drain = StepReport {
        index: reports.len() + 1,
        label: "drain (calls in progress finish, none placed)".into(),
        machine: m0.zip(procfs::machine()),
        seconds: t0.elapsed().as_secs_f64(),
        stats,
        live_at_end: shared.live(),
        avg_live: avg.0 as f64 / avg.1.max(1) as f64,
        server: s0.zip(sample_server()),
        generator: g0.zip(gen_end),
        loadavg: procfs::loadavg(),
        server_idle_rss_kib: first_server.map(|s| s.rss_kib),
        server_udp_drops: server_drops(),
        avg_bridges: avg_b as f64 / avg.1.max(1) as f64,
        bridges_at_end: bridges(),
    };
    out(&drain.table(&targets));
    shared.exit.store(true, Ordering::Release);
    for h in handles {
        let _ = h.join();
    }

    // The whole run in one report.
    let mut total = Stats::default();
    for r in reports.iter().chain(std::iter::once(&drain)) {
        total.merge(&r.stats);
    }
    let whole = StepReport {
        index: 0,
        label: "whole run".into(),
        machine: first_machine.zip(procfs::machine()),
        seconds: run_start.elapsed().as_secs_f64(),
        stats: total,
        live_at_end: shared.live(),
        avg_live: whole_avg.0 as f64 / whole_avg.1.max(1) as f64,
        server: first_server.zip(sample_server()),
        generator: first_gen.zip(gen_end),
        loadavg: procfs::loadavg(),
        server_idle_rss_kib: first_server.map(|s| s.rss_kib),
        server_udp_drops: server_drops(),
        avg_bridges: whole_bridges as f64 / whole_avg.1.max(1) as f64,
        bridges_at_end: bridges(),
    };
    out(&whole.table(&targets));
    let ramp = !args.ramp.is_empty();
    if ramp {
        out(&format!(
            "highest step that held: {}\n",
            highest_held.as_deref().unwrap_or("none")
        ));
    }
    let server_final = sample_server();
    // Stop a spawned server first so its ticket count can go in the report.
    let tickets_filed = server.take().and_then(spawn::Server::stop);
    if let Some(n) = tickets_filed {
        out(&format!("tickets filed (spawned server's database): {n}\n"));
    }
    if args.json {
        let doc = serde_json::json!({
            "tickets_filed": tickets_filed,
            "target": args.target.to_string(),
            "script": script.name,
            "keys": script.keys(),
            "threads": args.threads,
            "agents": args.agents,
            "agent_threads": agent_threads,
            "agents_registered_before_first_call": agents_registered,
            "agents_register_seconds": register_seconds,
            "steps": reports.iter().map(|r| r.json(&targets)).collect::<Vec<_>>(),
            "drain": drain.json(&targets),
            "total": whole.json(&targets),
            "highest_step_held": highest_held,
            "all_checked_steps_held": all_held,
            "server_peak": server_final.map(|s: ProcSample| serde_json::json!({"rss_peak_kib": s.hwm_kib})),
        });
        println!("{doc}");
    }
    Ok(all_held)
}

/// The spawned server's config beyond storage and drain: (more `limits:` keys, other
/// top-level keys). Always: no per-source call limits (every call comes from this one
/// address). With agents: the agents, the queue, no REGISTER rate limit, room for the calls
/// and their operator legs.
fn spawned_config(args: &Args) -> (String, String) {
    let media = if args.server_realtime {
        "media:\n  realtime: true\n".to_string()
    } else {
        String::new()
    };
    // Every call comes from this one address: the per-source call limits are off.
    let per_source = "  max_calls_per_source: 0\n  invites_per_second: 0\n";
    if args.agents == 0 {
        return (per_source.to_string(), media);
    }
    let limits = format!("  options_per_second: 0\n  max_calls: 10000\n{per_source}");
    let mut extra = media + "agents:\n";
    for n in 1..=args.agents {
        extra += &format!(
            "  - {{id: {:?}, password: {:?}}}\n",
            agents::agent_id(n),
            args.agent_password
        );
    }
    extra += &format!(
        "queues:\n  - name: {:?}\n    strategy: longest_idle\n    wrap_up_seconds: 0\n    ring_timeout_seconds: 10\n    no_answer_pause_seconds: 5\n    max_wait_seconds: 3600\n    max_length: 100000\n    announce_every_seconds: 3600\n",
        args.queue
    );
    (limits, extra)
}

fn plan(args: &Args) -> anyhow::Result<Vec<Plan>> {
    let modes = usize::from(args.calls.is_some())
        + usize::from(args.concurrent.is_some())
        + usize::from(!args.ramp.is_empty());
    anyhow::ensure!(
        modes == 1,
        "give exactly one of --calls N --rate R, --concurrent C, --ramp C1,C2,..."
    );
    if let Some(n) = args.calls {
        let rate = args.rate.unwrap_or(0.0);
        anyhow::ensure!(rate > 0.0, "--calls needs --rate > 0");
        let placing = n as f64 / rate;
        let steps = (placing / args.step_seconds).ceil().max(1.0) as usize;
        return Ok((0..steps)
            .map(|i| {
                let left = placing - i as f64 * args.step_seconds;
                Plan {
                    label: format!("{n} calls at {rate}/s ({}/{})", i + 1, steps),
                    seconds: left.min(args.step_seconds),
                    concurrent: None,
                    check: false,
                }
            })
            .collect());
    }
    if let Some(c) = args.concurrent {
        return Ok(vec![Plan {
            label: format!("{c} concurrent"),
            seconds: args.duration.unwrap_or(args.step_seconds),
            concurrent: Some(c),
            check: false,
        }]);
    }
    Ok(args
        .ramp
        .iter()
        .map(|c| Plan {
            label: format!("{c} concurrent"),
            seconds: args.step_seconds,
            concurrent: Some(*c),
            check: true,
        })
        .collect())
}
