//! The command line as admins use it: `ivr311 check` and `ivr311 tickets list`.

mod common;

use ivr311::dispatch::tickets::{Channel, NewTicket, TicketStore};
use std::process::Command;

fn ivr311(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ivr311"))
        .args(args)
        .current_dir(common::repo())
        .env("RUST_LOG", "warn")
        .output()
        .expect("binary runs")
}

#[test]
fn check_accepts_the_shipped_menu() {
    let out = ivr311(&["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("menus/311.yaml: ok"));
}

#[test]
fn check_refuses_a_broken_menu_with_path_line_col() {
    let menu = "tests/fixtures/menus/several_problems.yaml";
    let out = ivr311(&["check", "--menu", menu]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "all problems at once: {text}");
    for l in &lines {
        let mut parts = l.splitn(4, ':');
        assert_eq!(parts.next(), Some(menu), "{l}");
        assert!(
            parts.next().unwrap().parse::<usize>().is_ok(),
            "line number: {l}"
        );
        assert!(
            parts.next().unwrap().parse::<usize>().is_ok(),
            "column: {l}"
        );
    }
}

#[tokio::test]
async fn tickets_list_shows_filed_tickets_as_table_and_json() {
    let db = std::env::temp_dir().join(format!("ivr311-cli-{}.db", rand::random::<u64>()));
    let store = TicketStore::open(&db).await.unwrap();
    let t = store
        .file(NewTicket {
            service_code: "pothole".into(),
            service_name: "Pothole".into(),
            zipcode: Some("94103".into()),
            phone: Some("+15550001111".into()),
            channel: Channel::Phone,
            ..Default::default()
        })
        .await
        .unwrap();
    store.close().await;
    let db_s = db.display().to_string();
    let out = ivr311(&["tickets", "list", "--db", &db_s]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&t.service_request_id.to_string())
            && text.contains("pothole")
            && text.contains("94103"),
        "{text}"
    );
    let out = ivr311(&["tickets", "list", "--db", &db_s, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["service_request_id"], t.service_request_id);
    assert_eq!(v[0]["zipcode"], "94103");
}

/// Fields that reached the database with terminal escape sequences in them (from a web
/// client, an older build, a hand edit) are shown inert: no escape, bell, C1 control or
/// bidirectional override reaches the admin's terminal, in the table or in the JSON, and the
/// JSON still reads back as the stored text.
#[tokio::test]
async fn tickets_list_never_prints_control_characters() {
    let db = std::env::temp_dir().join(format!("ivr311-cli-esc-{}.db", rand::random::<u64>()));
    let store = TicketStore::open(&db).await.unwrap();
    let phone = "\u{1b}]0;owned\u{7}+1555\u{1b}[2J\u{9b}1m\u{202e}";
    let t = store
        .file(NewTicket {
            service_code: "pothole\u{1b}[8m".into(),
            service_name: "Pothole".into(),
            zipcode: Some("9\r4103".into()),
            phone: Some(phone.into()),
            description: Some("\u{7f}\u{85}".into()),
            channel: Channel::Web,
            ..Default::default()
        })
        .await
        .unwrap();
    store.close().await;
    let db_s = db.display().to_string();
    let inert = |out: &[u8]| {
        let text = String::from_utf8(out.to_vec()).unwrap();
        let bad: Vec<char> = text
            .chars()
            .filter(|c| {
                (c.is_control() && *c != '\n')
                    || ('\u{202A}'..='\u{202E}').contains(c)
                    || ('\u{2066}'..='\u{2069}').contains(c)
            })
            .collect();
        assert!(bad.is_empty(), "{bad:?} in {text:?}");
        text
    };
    let out = ivr311(&["tickets", "list", "--db", &db_s]);
    assert!(out.status.success());
    let text = inert(&out.stdout);
    assert!(
        text.contains(&t.service_request_id.to_string()) && text.contains("?]0;owned?+1555?[2J"),
        "{text}"
    );
    let out = ivr311(&["tickets", "list", "--db", &db_s, "--json"]);
    assert!(out.status.success());
    inert(&out.stdout);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["phone"], phone, "the JSON reads back as stored");
    assert_eq!(v[0]["description"], "\u{7f}\u{85}");
    let _ = std::fs::remove_file(db);
}

/// `ivr311 serve` as operators run it: SIGHUP reloads the menu; a broken one is refused and the
/// old one keeps serving; SIGTERM stops it. Its log, read through a pipe as a service manager
/// or a log file would, is plain text: no terminal colour codes.
#[test]
fn sighup_reloads_the_menu_and_sigterm_stops_the_server() {
    use std::io::{BufRead, BufReader};
    let menu = std::env::temp_dir().join(format!("ivr311-hup-{}.yaml", rand::random::<u64>()));
    std::fs::copy(common::repo().join("menus/311.yaml"), &menu).unwrap();
    let db = std::env::temp_dir().join(format!("ivr311-hup-{}.db", rand::random::<u64>()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ivr311"))
        .args([
            "serve",
            "--sip",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--rtp-ports",
            "41000-41100",
        ])
        .arg("--menu")
        .arg(&menu)
        .arg("--db")
        .arg(&db)
        .current_dir(common::repo())
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("server starts");
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |needle: &str| -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) => {
                    assert!(!l.contains('\u{1b}'), "colour codes in a piped log: {l:?}");
                    if l.contains(needle) {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    };
    let kill = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    assert!(wait_for("ivr311 serving"), "server never came up");
    kill("-HUP");
    assert!(wait_for("menu reloaded for new calls"), "SIGHUP reloads");
    let text = std::fs::read_to_string(&menu).unwrap();
    std::fs::write(
        &menu,
        text.replacen("{goto: streets}", "{goto: nowhere}", 1),
    )
    .unwrap();
    kill("-HUP");
    assert!(wait_for("menu reload refused"), "a broken menu is refused");
    kill("-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let _ = std::fs::remove_file(menu);
}

/// `ivr311 serve` with flags that cannot work, run as a new user would, from a directory that
/// is not the repository: stderr says what failed, where and why, each cause once, with the
/// hint that helps.
fn serve_failure(dir: &std::path::Path, extra: &[&str]) -> String {
    let menu = common::repo().join("menus/311.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_ivr311"))
        .args(["serve", "--sip", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--menu")
        .arg(&menu)
        .args(extra)
        .current_dir(dir)
        .env("RUST_LOG", "error")
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(1), "start-up failure exits 1");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_start_up_failure_says_each_cause_once_with_a_hint() {
    let dir = std::env::temp_dir().join(format!("ivr311-cwd-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let cwd = dir.canonicalize().unwrap();

    // No prompts directory where the server looks (relative to the working directory).
    let text = serve_failure(&dir, &[]);
    assert_eq!(
        text.matches("No such file or directory").count(),
        1,
        "the cause once: {text}"
    );
    assert!(
        text.contains(&format!(
            "the prompts directory is prompts, relative to the working directory {}",
            cwd.display()
        )) && text.contains("--prompts"),
        "says where it looked and how to change it: {text}"
    );

    // A database the server cannot open.
    let prompts = common::repo().join("prompts");
    let prompts = prompts.to_str().unwrap();
    for db in ["/nonexistent-ivr311-dir/x.db", "mysql://ivr@db.example/ivr"] {
        let text = serve_failure(&dir, &["--prompts", prompts, "--db", db]);
        assert_eq!(
            text.matches("unable to open database file").count(),
            1,
            "the cause once: {text}"
        );
        assert_eq!(text.matches(db).count(), 1, "the path once: {text}");
        assert!(
            text.contains("--db (IVR311_DB) takes the path of a SQLite database file"),
            "says which forms --db takes: {text}"
        );
        assert_eq!(
            text.contains("of database URLs only postgres:// is taken"),
            db.contains("://"),
            "{text}"
        );
    }
    // A PostgreSQL server that cannot be reached: named once, its password never shown.
    let text = serve_failure(
        &dir,
        &[
            "--prompts",
            prompts,
            "--db",
            "postgres://ivr:s3cret@db.invalid/ivr",
        ],
    );
    assert_eq!(
        text.matches("cannot open ticket database postgres://ivr:***@db.invalid/ivr")
            .count(),
        1,
        "the database once, password hidden: {text}"
    );
    assert!(
        !text.contains("s3cret"),
        "the password is never printed: {text}"
    );
    assert!(text.contains("or a PostgreSQL URL"), "{text}");

    // A config file with an unknown key: its location once, as path:line:col.
    let config = dir.join("bad.yaml");
    std::fs::write(&config, "emergency: {bogus: 1}\n").unwrap();
    let text = serve_failure(&dir, &["--config", config.to_str().unwrap()]);
    assert!(
        text.contains(&format!(
            "{}:1:13: emergency: unknown field `bogus`",
            config.display()
        )),
        "{text}"
    );
    assert!(
        !text.contains("at line 1 column 13"),
        "location twice: {text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_config_refuses_a_transfers_list_that_cannot_work_and_says_where() {
    let dir = std::env::temp_dir().join(format!("ivr311-transfers-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "agents:\n  - {id: \"1001\", password: \"pw\"}\ntransfers:\n  - {name: crisis, number: \"988\", uri: \"sip:988@198.51.100.30\"}\n  - {name: crisis2, number: \"988\", uri: \"sip:x@198.51.100.31\"}\n",
            ":4:3: transfers: two entries have the number \"988\"",
        ),
        (
            "agents:\n  - {id: \"1001\", password: \"pw\"}\ntransfers:\n  - {name: desk, number: \"1001\", uri: \"sip:988@198.51.100.30\"}\n",
            ": transfers: \"1001\" is also an agent's id",
        ),
        (
            "transfers:\n  - {name: desk, number: \"911\", uri: \"sip:911@198.51.100.30\"}\n",
            "911",
        ),
        (
            "transfers:\n  - {name: desk, number: \"7001\", uri: \"http://198.51.100.30/\"}\n",
            ":2:3: transfers: desk: uri \"http://198.51.100.30/\" must be sip:",
        ),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let path = dir.join(format!("c{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let out = ivr311(&["check", "--config", path.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{yaml}: {text}");
        assert!(
            text.contains(&format!(
                "{}{want}",
                if want.starts_with(':') {
                    path.display().to_string()
                } else {
                    String::new()
                }
            )),
            "{yaml}: {text}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_config_checks_every_lines_menu() {
    let dir = std::env::temp_dir().join(format!("ivr311-lines-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        "lines:\n  - {number: \"311\", menu: menus/311.yaml}\n  - {number: \"3115550199\", menu: menus/spanish-direct.yaml}\n",
    )
    .unwrap();
    let out = ivr311(&["check", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("menus/311.yaml: ok"), "{text}");
    assert!(text.contains("menus/spanish-direct.yaml: ok"), "{text}");

    // A line's broken menu fails the check with its path:line:col, the others still checked.
    let broken = dir.join("broken.yaml");
    let good = std::fs::read_to_string(common::repo().join("menus/spanish-direct.yaml")).unwrap();
    std::fs::write(
        &broken,
        good.replacen("{goto: streets}", "{goto: streetz}", 1),
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "lines:\n  - {{number: \"3115550199\", menu: {}}}\n",
            broken.display()
        ),
    )
    .unwrap();
    let out = ivr311(&["check", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("menus/311.yaml: ok"), "{text}");
    let line = (text.lines())
        .find(|l| l.contains("streetz"))
        .unwrap_or_else(|| panic!("{text}"));
    let rest = line
        .strip_prefix(&format!("{}:", broken.display()))
        .unwrap_or_else(|| panic!("{line}"));
    let mut parts = rest.splitn(3, ':');
    assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
    assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `check --config` says what `serve` would log at start: a menu `transfer` to a line that is
/// not a crisis entry of `transfers` (callers would hear "dial 988" instead of being put
/// through). A warning, not a failure.
#[test]
fn check_config_warns_about_a_menu_transfer_to_a_line_that_is_not_configured() {
    let dir = std::env::temp_dir().join(format!("ivr311-crisis-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(&config, "agents: []\n").unwrap();
    let out = ivr311(&["check", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let warning = (text.lines())
        .find(|l| l.contains("\"lifeline\""))
        .unwrap_or_else(|| panic!("no warning about the lifeline: {text}"));
    assert!(
        warning.starts_with("menus/311.yaml: warning: ") && warning.contains("crisis: true"),
        "{warning}"
    );

    std::fs::write(
        &config,
        "transfers:\n  - {name: lifeline, number: \"988\", uri: \"sip:988@198.51.100.30\", crisis: true}\n",
    )
    .unwrap();
    let out = ivr311(&["check", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("\"lifeline\""), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}
