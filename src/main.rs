//! `ivr311` command line: parse flags, load config, start the server or run a one-shot
//! command (`check`, `tickets list`, `tickets generate`, `agent-hash`), and nothing more.

use anyhow::Context;
use clap::{Parser, Subcommand};
use ivr311::config::{FileConfig, ServeArgs};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "ivr311",
    version,
    about = "Open telephony server for city 311 lines"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Answer calls (the default command).
    Serve(ServeArgs),
    /// Check a menu file (and with `--config`, the settings file and every line's menu): exit
    /// 0, or print `path:line:col: message` lines and exit 1. Settings that work but leave the line open
    /// to abuse are printed as `path: warning: ...` lines.
    Check {
        #[arg(long, env = "IVR311_MENU", default_value = "menus/311.yaml")]
        menu: PathBuf,
        #[arg(long, env = "IVR311_PROMPTS", default_value = "prompts")]
        prompts: PathBuf,
        /// The `--config` YAML `serve` would use.
        #[arg(long, env = "IVR311_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Service requests in the database.
    Tickets {
        #[command(subcommand)]
        command: TicketsCommand,
    },
    /// A resident's records request or erasure request, by phone number.
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
    },
    /// Print an operator's `password_ha1` for the config: the digest hashes of the password
    /// (read from standard input, without echo at a terminal, so that it stays out of shell
    /// history and process lists), for each algorithm the registrar can offer.
    AgentHash {
        /// The agent's id: the SIP user name its phone registers with.
        id: String,
    },
}

#[derive(Subcommand)]
enum TicketsCommand {
    /// List tickets, newest first.
    List {
        #[arg(long, env = "IVR311_DB", default_value = "ivr311.db")]
        db: PathBuf,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Fill a database with synthetic tickets for benchmarks: the shipped menu's services,
    /// requests spread over years (yearly growth, weekly and daily shape), ~85% closed,
    /// ZIP codes, house numbers, coordinates, numbers in the fictional 555-01xx range.
    /// Generation commits large transactions with synchronous=OFF on its own connection:
    /// the result is a benchmark fixture. Refuses a database that already has tickets
    /// unless --append.
    Generate {
        #[arg(long, env = "IVR311_DB")]
        db: PathBuf,
        /// How many tickets (at most 45,000,000 in one database).
        #[arg(long)]
        count: u64,
        /// Random seed: the same seed, count and years give the same tickets on the same day.
        /// Default: a random seed, printed.
        #[arg(long)]
        seed: Option<u64>,
        /// Spread the requests over this many years before now.
        #[arg(long, default_value_t = 5)]
        years: u32,
        /// Add to a database that already has tickets.
        #[arg(long)]
        append: bool,
    },
}

#[derive(clap::Args)]
struct PrivacyArgs {
    /// The resident's number: E.164 (`+12125550100`) or national (`212-555-0100`).
    #[arg(long)]
    phone: String,
    #[arg(long, env = "IVR311_DB", default_value = "ivr311.db")]
    db: PathBuf,
    /// The `--config` YAML `serve` uses (for `storage.recordings_dir`).
    #[arg(long, env = "IVR311_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PrivacyCommand {
    /// Print, as JSON, every row that holds the number (tickets, call history, call-backs,
    /// the 911 audit, outbox items, transfers) and the paths of the recordings linked to it.
    Export(PrivacyArgs),
    /// Remove the number from every table (rows stay, replaced by `erased`), delete the
    /// recordings linked to it, and record the erasure. The 911 audit is kept (README).
    Erase {
        #[command(flatten)]
        args: PrivacyArgs,
        /// Who asked for it, for the audit. Default: the user running the command.
        #[arg(long)]
        by: Option<String>,
    },
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: a log file or journal read with
        // grep gets plain text (and the server skips formatting the escapes per line).
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let command =
        cli.command
            .unwrap_or_else(|| match Cli::parse_from(["ivr311", "serve"]).command {
                Some(c) => c,
                None => unreachable!("serve parses"),
            });
    match command {
        Command::Check {
            menu,
            prompts,
            config,
        } => {
            let settings = config.as_deref().map(check_config);
            let Some(settings) = settings else {
                return check_menu(&menu, &prompts);
            };
            let Some(settings) = settings else {
                return ExitCode::FAILURE;
            };
            // The default line's menu, then each other line's menu file once.
            let mut menus = vec![menu];
            for l in &settings.lines {
                if !menus.contains(&l.menu) {
                    menus.push(l.menu.clone());
                }
            }
            let failed = (menus.iter())
                .map(|m| check_menu_with(m, &prompts, Some(&settings)))
                .filter(|c| *c != ExitCode::SUCCESS)
                .count();
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Serve(args) => {
            let (menu, prompts, db) = (args.menu.clone(), args.prompts.clone(), args.db.clone());
            run(serve(args), |e| hints(e, &menu, &prompts, Some(&db)))
        }
        Command::Tickets {
            command: TicketsCommand::List { db, json, limit },
        } => {
            let at = db.clone();
            run(list_tickets(db, json, limit), |e| db_hints(e, &at))
        }
        Command::Tickets {
            command:
                TicketsCommand::Generate {
                    db,
                    count,
                    seed,
                    years,
                    append,
                },
        } => {
            let at = db.clone();
            let plan = ivr311::dispatch::generate::GeneratePlan {
                count,
                seed: seed.unwrap_or_else(rand::random),
                years,
                append,
                now: time::OffsetDateTime::now_utc(),
            };
            run(generate_tickets(db, plan), |e| db_hints(e, &at))
        }
        Command::Privacy { command } => {
            let (args, by) = match command {
                PrivacyCommand::Export(a) => (a, None),
                PrivacyCommand::Erase { args, by } => {
                    let by = by
                        .or_else(|| std::env::var("SUDO_USER").ok())
                        .or_else(|| std::env::var("USER").ok())
                        .unwrap_or_else(|| "unknown".to_owned());
                    (args, Some(by))
                }
            };
            let at = args.db.clone();
            run(privacy(args, by), |e| db_hints(e, &at))
        }
        Command::AgentHash { id } => match agent_hash(&id) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ivr311 agent-hash: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `ivr311 agent-hash <id>`: read the password, print the config lines.
fn agent_hash(id: &str) -> anyhow::Result<()> {
    use ivr311::sip::registrar::{PasswordHa1, REALM};
    anyhow::ensure!(!id.trim().is_empty(), "the agent id is empty");
    let password = read_password(&format!("Password for agent {id}: "))
        .context("cannot read the password from standard input")?;
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    let h = PasswordHa1::of(id, REALM, &password);
    let quoted = serde_json::to_string(id)?;
    println!("# agents: entry for {quoted}, digest realm \"{REALM}\" (ivr311 agent-hash)");
    println!("- id: {quoted}");
    println!("  password_ha1:");
    println!("    SHA-256: \"{}\"", h.sha256.unwrap_or_default());
    println!("    MD5: \"{}\"", h.md5.unwrap_or_default());
    Ok(())
}

/// One line from standard input, without its line ending; at a terminal, after `prompt` (on
/// standard error) and with echo off.
fn read_password(prompt: &str) -> std::io::Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut line = String::new();
    if tty {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        let _echo = EchoOff::new();
        stdin.lock().read_line(&mut line)?;
        eprintln!();
    } else {
        stdin.lock().read_line(&mut line)?;
    }
    let end = line.trim_end_matches(['\n', '\r']).len();
    line.truncate(end);
    Ok(line)
}

/// Terminal echo off on standard input while it lives.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios we own; a failure leaves the
        // terminal as it was and is only reported by the return code.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return EchoOff(None);
            }
            let old = t;
            t.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return EchoOff(None);
            }
            EchoOff(Some(old))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores the settings read in `new` on the same descriptor.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, old);
            }
        }
    }
}

/// `check`: one menu file against the prompts, its problems printed.
fn check_menu(menu: &std::path::Path, prompts: &std::path::Path) -> ExitCode {
    check_menu_with(menu, prompts, None)
}

/// [`check_menu`], and with the settings, the warnings `serve` would log about the menu
/// against them (a `transfer` to a line that is not a crisis entry of `transfers`).
fn check_menu_with(
    menu: &std::path::Path,
    prompts: &std::path::Path,
    settings: Option<&FileConfig>,
) -> ExitCode {
    match ivr311::server::load_menu(menu, prompts) {
        Ok(m) => {
            println!(
                "{}: ok ({} menus, languages {})",
                menu.display(),
                m.file.menus.len(),
                m.file.languages.join(", ")
            );
            if let Some(settings) = settings {
                for (_, why) in ivr311::server::crisis_lines_missing(&m.file, &settings.transfers) {
                    println!("{}: warning: {why}", menu.display());
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            for h in hints(&anyhow::Error::new(e), menu, prompts, None) {
                eprintln!("hint: {h}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `check --config`: the file parses and its sections are usable (else their problems are
/// printed and `None` returned); its warnings are printed.
fn check_config(path: &std::path::Path) -> Option<FileConfig> {
    let file = match FileConfig::load(path) {
        Ok(f) => f,
        Err(e) => {
            println!("{e}");
            return None;
        }
    };
    let problems: Vec<String> = [
        file.emergency.check().err(),
        file.callback.check().err().map(|e| e.to_string()),
        ivr311::call::dialplan::check_transfers(&file.transfers, &file.agents, &file.queues)
            .err()
            .map(|e| e.to_string()),
        file.speech.zone().err().map(|e| e.to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    for p in &problems {
        println!("{}: {p}", path.display());
    }
    for w in file.warnings() {
        println!("{}: warning: {w}", path.display());
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        Some(file)
    } else {
        None
    }
}

fn run(
    f: impl std::future::Future<Output = anyhow::Result<()>>,
    hints: impl Fn(&anyhow::Error) -> Vec<String>,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ivr311: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ivr311: {}", describe(&e));
            for h in hints(&e) {
                eprintln!("hint: {h}");
            }
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes for a person at a terminal, each cause once.
///
/// ivr311's error types name their cause in their own message, so that a log line written
/// with `{e}` is complete on its own, and many library errors (sqlx's, serde_yaml's) do the
/// same. Walking `source()` as well would print each cause again, so a cause whose text the
/// message above it already contains is left out.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(text.trim()) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { ": " });
        }
        out.push_str(&text);
    }
    out
}

/// What to try next, for the start-up failures a new user meets first: a prompts directory
/// or menu looked up relative to another working directory, and a database the server
/// cannot open.
fn hints(
    e: &anyhow::Error,
    menu: &std::path::Path,
    prompts: &std::path::Path,
    db: Option<&std::path::Path>,
) -> Vec<String> {
    use ivr311::menu::validate::MenuError;
    let mut out = Vec::new();
    for cause in e.chain() {
        if let Some(MenuError::Io { path, .. }) = cause.downcast_ref::<MenuError>() {
            let (what, flag) = if path == prompts {
                ("prompts directory", "--prompts DIR (IVR311_PROMPTS)")
            } else if path == menu {
                ("menu file", "--menu PATH (IVR311_MENU)")
            } else {
                continue;
            };
            let mut h = format!("the {what} is {}", path.display());
            if path.is_relative() {
                match std::env::current_dir() {
                    Ok(cwd) => h.push_str(&format!(
                        ", relative to the working directory {}",
                        cwd.display()
                    )),
                    Err(_) => h.push_str(", relative to the working directory"),
                }
            }
            h.push_str(&format!(
                "; run ivr311 from the directory that holds it, or give {flag}"
            ));
            out.push(h);
            break;
        }
    }
    if let Some(db) = db {
        out.extend(db_hints(e, db));
    }
    out
}

/// The forms `--db` takes, when the database could not be opened.
fn db_hints(e: &anyhow::Error, db: &std::path::Path) -> Vec<String> {
    use ivr311::dispatch::tickets::StoreError;
    let opened = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StoreError>(),
            Some(StoreError::Open { .. })
        )
    });
    if !opened {
        return Vec::new();
    }
    let mut h = String::from(
        "--db (IVR311_DB) takes the path of a SQLite database file, created if missing; its \
         directory must exist and be writable by this user (e.g. --db /var/lib/ivr311/ivr311.db), \
         or a PostgreSQL URL (postgres://user@host:5432/ivr311; the database must exist)",
    );
    let text = db.to_string_lossy();
    if text.contains("://") && !text.starts_with("postgres") {
        h.push_str("; of database URLs only postgres:// is taken");
    }
    vec![h]
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let server = ivr311::server::start(&args, file)
        .await
        .context("could not start")?;
    wait_for_signal(&server).await;
    tracing::info!("shutting down: refusing new calls, draining calls in progress");
    server.shutdown().await;
    Ok(())
}

/// `ivr311 privacy export|erase`: export when `by` is `None`, else erase on their behalf.
async fn privacy(args: PrivacyArgs, by: Option<String>) -> anyhow::Result<()> {
    use ivr311::dispatch::tickets::TicketStore;
    use ivr311::privacy::{request, Phone};
    let phone = Phone::parse(&args.phone)?;
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let dir = &file.storage.recordings_dir;
    let store = TicketStore::open(&args.db).await?;
    let out = match by {
        None => request::export(&store, dir, &phone).await?,
        Some(by) => {
            let now = time::OffsetDateTime::now_utc();
            let report = request::erase(&store, dir, &phone, &by, now).await?;
            serde_json::json!({ "erased": report })
        }
    };
    store.close().await;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn list_tickets(db: PathBuf, json: bool, limit: u32) -> anyhow::Result<()> {
    use ivr311::dispatch::tickets::{TicketQuery, TicketStore};
    let store = TicketStore::open(&db).await?;
    let q = TicketQuery {
        limit: Some(limit),
        ..TicketQuery::default()
    };
    let tickets = store.list(&q).await?;
    if json {
        let text = serde_json::to_string_pretty(&tickets)?;
        println!("{}", escape_for_terminal(&text));
        return Ok(());
    }
    println!(
        "{:<10} {:<20} {:<7} {:<6} {:<8} {:<16} {:<22}",
        "id", "service", "status", "zip", "channel", "phone", "requested"
    );
    for t in &tickets {
        println!(
            "{:<10} {:<20} {:<7} {:<6} {:<8} {:<16} {:<22}",
            t.service_request_id,
            printable(&t.service_code),
            t.status.as_str(),
            printable(t.zipcode.as_deref().unwrap_or("-")),
            t.channel.as_str(),
            printable(t.phone.as_deref().unwrap_or("-")),
            t.requested_datetime.to_string(),
        );
    }
    println!("{} ticket(s)", tickets.len());
    Ok(())
}

/// `ivr311 tickets generate`: fill the database, then say what was done.
async fn generate_tickets(
    db: PathBuf,
    plan: ivr311::dispatch::generate::GeneratePlan,
) -> anyhow::Result<()> {
    use ivr311::dispatch::tickets::TicketStore;
    let store = TicketStore::open(&db).await?;
    eprintln!(
        "generating {} ticket(s) over {} year(s), seed {}",
        plan.count, plan.years, plan.seed
    );
    let r = ivr311::dispatch::generate::generate(&store, &plan).await;
    store.close().await;
    let r = r?;
    let total = r.existing + r.written;
    println!(
        "{} ticket(s) written ({} open) in {:.1} s, indexes built in {:.1} s; {} in the database",
        r.written,
        r.open,
        r.insert_time.as_secs_f64(),
        r.index_time.as_secs_f64(),
        total
    );
    println!(
        "ticket numbers redrawn because taken: {} ({:.4} per ticket); at {} tickets a new \
         filing finds its first number taken with probability {:.4}",
        r.redraws,
        r.redraws as f64 / r.written.max(1) as f64,
        total,
        total as f64 / 90_000_000.0
    );
    Ok(())
}

/// Characters a terminal may act on rather than show: C0 and C1 controls (an escape sequence
/// in a web-submitted field could retitle the window, rewrite the screen or worse) and the
/// bidirectional overrides that reorder what is shown.
fn acts_on_terminal(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A stored value for the table: each such character shown as `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if acts_on_terminal(c) { '?' } else { c })
        .collect()
}

/// JSON for a terminal: such characters that JSON lets through unescaped (DEL, C1, bidi
/// overrides) written as `\uXXXX`, which reads back as the same text. They can only be inside
/// strings: the rest of a JSON document is ASCII.
fn escape_for_terminal(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if acts_on_terminal(c) && c != '\n' {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Wait for SIGTERM or Ctrl-C; SIGHUP reloads the menu (and prompts) for new calls.
async fn wait_for_signal(server: &ivr311::server::RunningServer) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the menu");
                    if let Err(e) = server.menu.reload().await {
                        tracing::error!("menu reload refused; the menu in service stays:\n{e}");
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = server;
        let _ = tokio::signal::ctrl_c().await;
    }
}
