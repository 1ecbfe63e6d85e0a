//! Benchmark: the ticket store at a city's scale (BENCHMARKS.md, "A store with ten million
//! tickets"). Measurements, not assertions: ignored, run by hand on a generated store.
//!
//! ```text
//! cargo build --release
//! target/release/ivr311 tickets generate --db tmp/10m.db --count 10000000 --seed 27 --years 5
//! IVR311_BENCH_DB=tmp/10m.db cargo test --release --test store_bench -- --ignored \
//!     --nocapture --test-threads 1
//! ```
//!
//! `serve_start_and_open311` starts `ivr311 serve` on the store (the binary this test was built
//! with), times process start to `/health/ready` 200, then times Open311 `GET requests.json`
//! with the spec's filters (and the server's CPU time per answer, from `/proc`) and durable
//! Open311 POSTs over HTTP. `phone_lookups_and_filing`
//! opens the store in process and times the menu's status lookups (by ticket number, and the
//! caller's open request by number), how often a random ticket number is taken, filing with
//! concurrent filers through `TicketStore::file`, and this disk's fsync floor. Both add
//! tickets to the store (it is a fixture). `IVR311_BENCH_N` sets the requests per query kind
//! (default 300); `IVR311_BENCH_SECONDS` each filing run's length (default 8).
//! `IVR311_BENCH_DB` may also be a `postgres://` URL: the same measurements on PostgreSQL.
//! `IVR311_BENCH_BIN` runs another `ivr311` binary as the server (another build, to compare
//! two builds in runs alternated within the same minutes).

use ivr311::dispatch::tickets::{Channel, NewTicket, TicketQuery, TicketStore};
use rand::Rng;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CODES: &[&str] = &[
    "noise",
    "missed_pickup",
    "pothole",
    "blocked_driveway",
    "streetlight",
    "bulky_item",
    "graffiti",
    "abandoned_vehicle",
    "fallen_tree",
    "dead_animal",
    "stray_animal",
    "call_back",
];

fn db() -> PathBuf {
    PathBuf::from(std::env::var("IVR311_BENCH_DB").expect("IVR311_BENCH_DB: a generated store"))
}

fn n() -> usize {
    std::env::var("IVR311_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn run_for() -> Duration {
    Duration::from_secs(
        std::env::var("IVR311_BENCH_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8),
    )
}

/// p50, p99 and max of `d`, in milliseconds.
fn summary(d: &mut [Duration]) -> String {
    d.sort();
    let at = |q: f64| {
        let i = ((d.len() as f64 * q).ceil() as usize).clamp(1, d.len()) - 1;
        d[i].as_secs_f64() * 1000.0
    };
    format!(
        "n={:<5} p50={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        d.len(),
        at(0.50),
        at(0.99),
        at(1.0)
    )
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// `GET /health/ready` answers 200 (false while nothing listens yet).
async fn ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!("GET /health/ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    raw.starts_with(b"HTTP/1.1 200")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn iso(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

/// Tickets to ask for: numbers from random hours of the store's years, and callers' numbers
/// still kept (the last 400 days).
async fn samples(store: &TicketStore, now: OffsetDateTime) -> (Vec<u64>, Vec<String>) {
    let mut rng = rand::rng();
    let mut ids = Vec::new();
    let mut phones = Vec::new();
    while ids.len() < 2000 {
        let start = now - time::Duration::hours(rng.random_range(1..5 * 365 * 24));
        let found = store
            .list(&TicketQuery {
                start: Some(start),
                end: Some(start + time::Duration::hours(2)),
                limit: Some(50),
                ..TicketQuery::default()
            })
            .await
            .unwrap();
        ids.extend(found.iter().map(|t| t.service_request_id));
    }
    while phones.len() < 2000 {
        let start = now - time::Duration::hours(rng.random_range(1..399 * 24));
        let found = store
            .list(&TicketQuery {
                start: Some(start),
                end: Some(start + time::Duration::hours(2)),
                limit: Some(50),
                ..TicketQuery::default()
            })
            .await
            .unwrap();
        phones.extend(
            found
                .into_iter()
                .filter_map(|t| t.phone)
                .filter(|p| p.starts_with('+')),
        );
    }
    (ids, phones)
}

/// User and system CPU time process `pid` has used (Linux `/proc`; `None` elsewhere).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15, in clock ticks.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(100);
    Some(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

struct Server {
    child: std::process::Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: needs a generated store in IVR311_BENCH_DB (see the file's docs)"]
async fn serve_start_and_open311() {
    let db = db();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("ivr311-bench-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bench.yaml");
    std::fs::write(
        &config,
        format!(
            "open311:\n  api_keys: [bench]\n  post_rate_per_minute: 0\nstorage:\n  recordings_dir: {}\n",
            dir.join("recordings").display()
        ),
    )
    .unwrap();
    let http_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    let started = Instant::now();
    let bin = std::env::var_os("IVR311_BENCH_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_ivr311")),
        PathBuf::from,
    );
    println!("server: {}", bin.display());
    let child = std::process::Command::new(&bin)
        .arg("serve")
        .args(["--sip", "127.0.0.1:0", "--http", &http_addr.to_string()])
        .arg("--menu")
        .arg(repo.join("menus/311.yaml"))
        .arg("--prompts")
        .arg(repo.join("prompts"))
        .arg("--db")
        .arg(&db)
        .arg("--config")
        .arg(&config)
        .args(["--rtp-ports", "40000-40198"])
        .env("RUST_LOG", "warn,ivr311::privacy=info")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Server { child };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        assert!(Instant::now() < deadline, "not ready within 10 minutes");
        if ready(http_addr).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "serve: process start to /health/ready 200: {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );

    let store = TicketStore::open(&db).await.unwrap();
    let now = OffsetDateTime::now_utc();
    let (ids, _) = samples(&store, now).await;
    store.close().await;
    let mut rng = rand::rng();
    let base = "/open311/v2/requests.json";
    type Query = Box<dyn Fn(&mut rand::rngs::ThreadRng) -> String>;
    let window = move |rng: &mut rand::rngs::ThreadRng| {
        let start = now - time::Duration::days(rng.random_range(90..5 * 365));
        format!(
            "start_date={}&end_date={}",
            iso(start),
            iso(start + time::Duration::days(90))
        )
    };
    let ids2 = ids.clone();
    let ids3 = ids.clone();
    let kinds: Vec<(&str, Query)> = vec![
        ("no filter (last 90 days)", Box::new(|_| String::new())),
        (
            "service_code",
            Box::new(|r| format!("service_code={}", CODES[r.random_range(0..CODES.len())])),
        ),
        (
            "service_code, 2 codes",
            Box::new(|r| {
                format!(
                    "service_code={},{}",
                    CODES[r.random_range(0..6)],
                    CODES[r.random_range(6..CODES.len())]
                )
            }),
        ),
        ("status=open", Box::new(|_| "status=open".into())),
        ("status=closed", Box::new(|_| "status=closed".into())),
        (
            "service_code + status=open",
            Box::new(|r| {
                format!(
                    "service_code={}&status=open",
                    CODES[r.random_range(0..CODES.len())]
                )
            }),
        ),
        ("90-day window", Box::new(move |r| window(r))),
        (
            "service_code + status + window",
            Box::new(move |r| {
                format!(
                    "service_code={}&status=closed&{}",
                    CODES[r.random_range(0..CODES.len())],
                    window(r)
                )
            }),
        ),
        (
            "service_request_id x1",
            Box::new(move |r| {
                format!("service_request_id={}", ids2[r.random_range(0..ids2.len())])
            }),
        ),
        (
            "service_request_id x50",
            Box::new(move |r| {
                let list: Vec<String> = (0..50)
                    .map(|_| ids3[r.random_range(0..ids3.len())].to_string())
                    .collect();
                format!("service_request_id={}", list.join(","))
            }),
        ),
    ];
    println!("Open311 GET {base}, one client, {} requests each:", n());
    let pid = server.child.id();
    for (name, query) in &kinds {
        let mut times = Vec::new();
        let mut rows = 0usize;
        let cpu_before = cpu_time(pid);
        for _ in 0..n() {
            let q = query(&mut rng);
            let t = Instant::now();
            let (status, body) = http(http_addr, "GET", &format!("{base}?{q}"), "").await;
            times.push(t.elapsed());
            assert_eq!(status, 200, "{q}: {body}");
            rows += body.matches("\"service_request_id\"").count();
        }
        // The server's own CPU per answer: what it costs whatever else the machine runs.
        let cpu = match (cpu_before, cpu_time(pid)) {
            (Some(a), Some(b)) => format!("{:.1} ms", (b - a).as_secs_f64() * 1000.0 / n() as f64),
            _ => "?".into(),
        };
        println!(
            "  {name:<32} {}  rows/response={}  server CPU/response={cpu}",
            summary(&mut times),
            rows / n()
        );
    }

    // Durable filing over HTTP, concurrent clients.
    for clients in [1usize, 16] {
        let stop = Instant::now() + run_for();
        let mut tasks = Vec::new();
        for c in 0..clients {
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                let body = format!(
                    "api_key=bench&service_code=pothole&lat=40.75&long=-73.99&description=bench+{c}"
                );
                while Instant::now() < stop {
                    let t = Instant::now();
                    let (status, b) = http(http_addr, "POST", base, &body).await;
                    assert_eq!(status, 200, "{b}");
                    times.push(t.elapsed());
                }
                times
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.extend(t.await.unwrap());
        }
        println!(
            "Open311 POST, {clients:>2} client(s): {:.0} tickets/s  {}",
            times.len() as f64 / run_for().as_secs_f64(),
            summary(&mut times)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: needs a generated store in IVR311_BENCH_DB (see the file's docs)"]
async fn phone_lookups_and_filing() {
    let db = db();
    let store = TicketStore::open(&db).await.unwrap();
    let now = OffsetDateTime::now_utc();
    let (ids, phones) = samples(&store, now).await;
    let mut rng = rand::rng();

    let mut times = Vec::new();
    for _ in 0..n().max(1000) {
        let id = ids[rng.random_range(0..ids.len())];
        let t = Instant::now();
        let found = store.get(id).await.unwrap();
        times.push(t.elapsed());
        assert!(found.is_some());
    }
    println!(
        "status lookup by ticket number (get):    {}",
        summary(&mut times)
    );

    let mut times = Vec::new();
    let mut open = 0;
    for _ in 0..n().max(1000) {
        let phone = &phones[rng.random_range(0..phones.len())];
        let t = Instant::now();
        let found = store.open_request_of(phone).await.unwrap();
        times.push(t.elapsed());
        open += usize::from(found.is_some());
    }
    println!(
        "caller's open request (open_request_of):  {}  with an open request: {open}",
        summary(&mut times)
    );

    // What a 1000-row Open311 answer costs in the store alone, without HTTP and JSON: the
    // public columns Open311 reads (`list_public`), and every column (`list`).
    let last_90_days = TicketQuery {
        start: Some(now - time::Duration::days(90)),
        ..TicketQuery::default()
    };
    let mut public_times = Vec::new();
    let mut list_times = Vec::new();
    for _ in 0..n().min(200) {
        let t = Instant::now();
        let found = store.list_public(&last_90_days).await.unwrap();
        public_times.push(t.elapsed());
        assert_eq!(found.len(), 1000);
        let t = Instant::now();
        let found = store.list(&last_90_days).await.unwrap();
        list_times.push(t.elapsed());
        assert_eq!(found.len(), 1000);
    }
    println!(
        "TicketStore::list_public, 1000 rows:      {}",
        summary(&mut public_times)
    );
    println!(
        "TicketStore::list, 1000 rows:             {}",
        summary(&mut list_times)
    );

    // How often `file`'s first random number is taken at this fill.
    let draws = 20_000;
    let mut taken = 0;
    for _ in 0..draws {
        let id = rng.random_range(10_000_000..=99_999_999u64);
        taken += usize::from(store.get(id).await.unwrap().is_some());
    }
    let p = taken as f64 / draws as f64;
    println!(
        "random ticket number already taken: {taken}/{draws} = {p:.4}; expected draws per \
         filing {:.3}; all {} draws taken: p^32 = {:.1e}",
        1.0 / (1.0 - p),
        32,
        p.powi(32)
    );

    // Durable filing through TicketStore::file, concurrent filers.
    let store = Arc::new(store);
    for filers in [1usize, 4, 16, 64] {
        let stop = Instant::now() + run_for();
        let mut tasks = Vec::new();
        for _ in 0..filers {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                while Instant::now() < stop {
                    let t = Instant::now();
                    store
                        .file(NewTicket {
                            service_code: "pothole".into(),
                            service_name: "Pothole".into(),
                            zipcode: Some("10001".into()),
                            phone: Some("+12125550100".into()),
                            channel: Channel::Phone,
                            ..NewTicket::default()
                        })
                        .await
                        .unwrap();
                    times.push(t.elapsed());
                }
                times
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.extend(t.await.unwrap());
        }
        println!(
            "TicketStore::file, {filers:>2} filer(s): {:.0} tickets/s  {}",
            times.len() as f64 / run_for().as_secs_f64(),
            summary(&mut times)
        );
    }
    store.close().await;

    // The disk's own floor, for a SQLite store (a PostgreSQL server's disk is its own).
    if !db.to_string_lossy().starts_with("postgres") {
        fsync_floor(&db.with_file_name("fsync-floor.db")).await;
    }
}

/// This disk's cost of a durable commit (WAL, synchronous=FULL, as the server runs): commits
/// of one small row each, then the same rows 50 to a commit (what group commit would give).
async fn fsync_floor(path: &std::path::Path) {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use sqlx::{ConnectOptions, Connection};
    let remove = || {
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
        }
    };
    remove();
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await
        .unwrap();
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        .execute(&mut conn)
        .await
        .unwrap();
    let commits = 300;
    let t = Instant::now();
    for i in 0..commits {
        sqlx::query("INSERT INTO t (v) VALUES (?)")
            .bind(format!("row {i}"))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let one = t.elapsed();
    let t = Instant::now();
    for c in 0..commits {
        let mut tx = conn.begin().await.unwrap();
        for i in 0..50 {
            sqlx::query("INSERT INTO t (v) VALUES (?)")
                .bind(format!("row {c}.{i}"))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let fifty = t.elapsed();
    println!(
        "fsync floor: {:.0} commits/s of one row ({:.2} ms each); 50 rows a commit: {:.0} rows/s",
        commits as f64 / one.as_secs_f64(),
        one.as_secs_f64() * 1000.0 / commits as f64,
        (commits * 50) as f64 / fifty.as_secs_f64()
    );
    conn.close().await.unwrap();
    remove();
}
