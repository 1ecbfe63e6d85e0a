//! A throwaway PostgreSQL server for tests: a cluster of its own in a temporary directory,
//! listening on 127.0.0.1 and a free port, with one empty database, stopped and removed when
//! the [`Postgres`] value is dropped.
//!
//! ```ignore
//! let pg = Postgres::start();
//! let pool = sqlx::PgPool::connect(&pg.url()).await?;
//! pg.kill();     // every connection is cut, as when the database server crashes
//! pg.restart();  // back on the same URL, after crash recovery
//! ```
//!
//! Each test gets its own cluster, so a test that takes its database away touches no other
//! test, and tests run side by side (nextest runs every test in a process of its own, so a
//! cluster shared per test binary would be one per test anyway). `initdb` costs a second of
//! CPU here (two busy cores): it runs once, into a template under cargo's `CARGO_TARGET_TMPDIR`
//! keyed by the server version, and each cluster is a copy of that template (about 0.35 s,
//! disk-bound), started and given its database in about 0.3 s more.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the server binaries run as
//! the `postgres` user (the Debian package creates it): the child process drops to its uid and
//! gid itself (no `runuser` or `setpriv` wrapper between us and the server, so the process we
//! hold is the postmaster, and kill() signals it). Not as root, they run as the current user.
//!
//! PostgreSQL missing is a panic that says what to install (`scripts/test` installs it),
//! never a skipped test.

use std::fs;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The database every cluster is created with; [`Postgres::url`] points at it.
pub const DATABASE: &str = "ivr311";

/// How long a server may take to accept connections after it was started.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a server may take to exit after an immediate shutdown before it is killed.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// Settings for [`Postgres::start_with`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `fsync=off` when false: faster, for tests that only need speed and never crash the
    /// server (a killed server without fsync can lose committed transactions). On by default.
    pub fsync: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { fsync: true }
    }
}

/// A running (or killed) throwaway cluster. Dropping it stops the server and removes its
/// directory.
pub struct Postgres {
    bin: PathBuf,
    /// The temporary directory: `data/` (the cluster), the server's Unix socket and `log`.
    dir: PathBuf,
    port: u16,
    options: PgOptions,
    user: Option<(u32, u32)>,
    server: Option<Child>,
}

impl Postgres {
    /// A new cluster with fsync on, accepting connections, with database [`DATABASE`].
    pub fn start() -> Postgres {
        Postgres::start_with(PgOptions::default())
    }

    pub fn start_with(options: PgOptions) -> Postgres {
        let bin = server_bindir();
        let user = server_user();
        let template = template(&bin, user);
        let dir = std::env::temp_dir().join(format!("ivr311-pg-{:016x}", rand::random::<u64>()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        // The server's Unix socket is here: nobody else on the machine may enter.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("restricting {}: {e}", dir.display()));
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("giving {} to postgres: {e}", dir.display()));
        }
        let mut pg = Postgres {
            bin,
            dir,
            port: 0,
            options,
            user,
            server: None,
        };
        // `cp -a` keeps the owner (postgres) and the 0700 mode the server insists on.
        run(Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(pg.data_dir()));
        // A free port, taken by the server a moment later: another process may take it in
        // between, so a server that could not bind is started again on another.
        for attempt in 1.. {
            pg.port = free_port();
            match pg.spawn_and_wait() {
                Ok(()) => break,
                Err(log) if attempt < 5 && log.contains("could not bind") => continue,
                Err(log) => panic!("PostgreSQL did not start:\n{log}"),
            }
        }
        pg.create_db(DATABASE);
        pg
    }

    /// `postgres://postgres@127.0.0.1:PORT/ivr311`.
    pub fn url(&self) -> String {
        self.url_of(DATABASE)
    }

    /// The URL of database `name` on this cluster.
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates another (empty) database on this cluster, and returns its URL.
    pub fn create_db(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "database names here are [a-z0-9_]+: {name:?}"
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url_of(name)
    }

    /// Runs `sql` in database `db` with psql (stopping at the first error) and returns what
    /// it printed, unaligned, fields separated by `|`. Panics when psql fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = run(Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Takes the database away as a crash would: an immediate shutdown (SIGQUIT to the
    /// postmaster) drops every connection at once and checkpoints nothing, so the next start
    /// runs crash recovery. Returns when the server has exited; new connections are refused.
    pub fn kill(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        stop(&mut server);
    }

    /// Starts the server again on the same port and data (after [`kill`](Self::kill)), and
    /// returns once it accepts connections (after crash recovery: one to two seconds here with
    /// fsync on): the same URLs work again.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.spawn_and_wait() {
            panic!("PostgreSQL did not restart:\n{log}");
        }
    }

    /// Whether the server process is running (not killed, not exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.server
            .as_mut()
            .is_some_and(|s| matches!(s.try_wait(), Ok(None)))
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the postmaster and waits until it accepts connections; on failure, the log.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap_or_else(|e| panic!("opening the server log: {e}"));
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("port={}", self.port)])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args([
                "-c",
                if self.options.fsync {
                    "fsync=on"
                } else {
                    "fsync=off"
                },
            ])
            // Small enough for many clusters side by side; enough for two nodes' pools.
            .args(["-c", "shared_buffers=16MB", "-c", "max_connections=100"])
            .args(["-c", "logging_collector=off"])
            // After kill(), recovery first syncs the data directory: one syncfs(2) instead of
            // an fsync per file (seconds on a busy disk).
            .args(["-c", "recovery_init_sync_method=syncfs"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log file"))
            .stderr(log);
        self.as_server_user(&mut cmd);
        let mut server = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.join("postgres").display()));
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(Some(status)) = server.try_wait() {
                return Err(format!("postgres exited ({status}):\n{}", self.log()));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", "postgres"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                self.server = Some(server);
                return Ok(());
            }
            if Instant::now() > deadline {
                stop(&mut server);
                return Err(format!(
                    "not accepting connections after {READY_WITHIN:?}:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn as_server_user(&self, cmd: &mut Command) {
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- PostgreSQL log (last {} lines) ---\n{}",
                tail.len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Immediate shutdown (SIGQUIT), then SIGKILL if the postmaster is still there after
/// [`EXIT_WITHIN`]; waits for it either way.
fn stop(server: &mut Child) {
    let pid = server.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child, which has not been waited for, so the pid is its.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let deadline = Instant::now() + EXIT_WITHIN;
    while Instant::now() < deadline {
        if !matches!(server.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// The directory with initdb, postgres, pg_isready and psql: `pg_config --bindir` when it has
/// the server, else the highest /usr/lib/postgresql/<version>/bin (Debian's layout).
fn server_bindir() -> PathBuf {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return dir;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed: these tests start a PostgreSQL server of their own \
             and need its programs (initdb, postgres, pg_isready, psql). Install the Debian \
             package `postgresql` (apt-get install postgresql), or run scripts/test, which \
             installs it."
        ),
    }
}

/// The uid and gid to run the server as: the `postgres` user when we are root (PostgreSQL
/// refuses to run as root), else none (the current user).
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the record it returns is read at once, before
    // any other call that could overwrite it (tests of one process may race here, but every
    // caller asks for the same user, so a clobbered record holds the same values).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        panic!(
            "the tests run as root, and PostgreSQL refuses to: they run it as the `postgres` \
             user, which does not exist. Install the Debian package `postgresql` (it creates \
             the user), or run the tests as another user."
        );
    }
    // SAFETY: pw is a valid passwd record (checked non-null above).
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// An initialised cluster to copy: made once per server version (and user) under cargo's
/// target tmp directory, shared by every test and test binary. Made in a directory of its own
/// and renamed into place, so a template is always whole, even after a maker was killed.
fn template(bin: &Path, user: Option<(u32, u32)>) -> PathBuf {
    let version = run(Command::new(bin.join("postgres")).arg("--version")).stdout;
    let version: String = String::from_utf8_lossy(&version)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let owner = user.map_or_else(|| "self".to_owned(), |(uid, _)| uid.to_string());
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let template = cache.join(format!("postgres-template-v1-{version}-{owner}"));
    if template.join("PG_VERSION").is_file() {
        return template;
    }
    // One maker at a time, across the tests of this process and other test processes: the
    // others wait (a second or so, once) and then find the template made.
    fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("creating {}: {e}", cache.display()));
    let lock = fs::File::create(cache.join("postgres-template.lock"))
        .unwrap_or_else(|e| panic!("creating the template lock in {}: {e}", cache.display()));
    // SAFETY: flock on a file descriptor we own and keep open until the end of this function
    // (closing it releases the lock).
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!(
            "locking {}: {}",
            cache.display(),
            std::io::Error::last_os_error()
        );
    }
    if template.join("PG_VERSION").is_file() {
        return template;
    }
    // initdb (as the server user) writes into a temporary directory of its own, which the
    // server user can reach; the result is then moved beside the template's final place.
    let work =
        std::env::temp_dir().join(format!("ivr311-pg-initdb-{:016x}", rand::random::<u64>()));
    fs::create_dir(&work).unwrap_or_else(|e| panic!("creating {}: {e}", work.display()));
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&work, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("giving {} to postgres: {e}", work.display()));
    }
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(work.join("data"))
        // Trust on loopback: the cluster lives for one test, on 127.0.0.1 and a socket in a
        // directory only its owner can enter.
        .args(["-A", "trust", "-U", "postgres", "--no-sync"])
        .args(["--encoding=UTF8", "--locale=C"])
        // 1 MB WAL segments instead of 16: a template a fifth the size, copied per test.
        .args(["--wal-segsize=1"])
        .stdin(Stdio::null());
    if let Some((uid, gid)) = user {
        initdb.uid(uid).gid(gid);
    }
    run(&mut initdb);
    let staged = cache.join(format!(".postgres-template-{:016x}", rand::random::<u64>()));
    run(Command::new("cp")
        .arg("-a")
        .arg(work.join("data"))
        .arg(&staged));
    let _ = fs::remove_dir_all(&work);
    if let Err(e) = fs::rename(&staged, &template) {
        let _ = fs::remove_dir_all(&staged);
        panic!(
            "moving the PostgreSQL template to {}: {e}",
            template.display()
        );
    }
    assert!(
        template.join("PG_VERSION").is_file(),
        "no PostgreSQL template at {}",
        template.display()
    );
    template
}

/// A port free on 127.0.0.1 just now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Runs a command to completion; panics with its output when it fails.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}
