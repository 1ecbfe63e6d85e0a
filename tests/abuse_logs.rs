//! Callers' numbers in the server's log lines: whole by default (operations match lines to
//! callers), and with `log.redact_numbers: true` only their last four digits, in the call's
//! lines, the call-back's and the call-back's outbound INVITE. (A test binary of its own: it
//! installs the process's log subscriber to read what the server writes.)

mod common;

use common::*;
use ivr311::config::{CallbackConfig, FileConfig};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Everything the server logs, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }

    /// Wait until the log has a line containing all of `words`; that line.
    async fn line_with(&self, words: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = (self.text().lines()).find(|l| words.iter().all(|w| l.contains(w))) {
                return l.to_owned();
            }
            assert!(Instant::now() < deadline, "no log line with {words:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A trunk in `trunks.allow` asserts `number` for a caller who asks for a call-back; the
/// call-back is dialled (an operator is free at once after the request).
async fn caller_called_back(redact: bool, number: &str, log: &Captured) -> String {
    let trunk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut file: FileConfig = agents_config(&["1001"], 20, 2);
    file.callback = CallbackConfig {
        trunk_uri: Some(format!("sip:{}", trunk.local_addr().unwrap())),
        first_delay_seconds: 0,
        ..CallbackConfig::default()
    };
    file.trunks.allow = vec!["127.0.0.1".parse().unwrap()];
    file.log.redact_numbers = redact;
    let srv = start_server(file).await;
    let _agent = TestAgent::login(srv.sip_addr, "1001").await;
    let json = [("Content-Type", "application/json")];
    let (code, _) = http(
        srv.http_addr,
        "POST",
        "/admin/agents/1001/pause",
        &json,
        b"{}",
    )
    .await;
    assert_eq!(code / 100, 2);
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let pai = format!("P-Asserted-Identity: <sip:{number}@127.0.0.1>\r\n");
    assert_eq!(ua.call_with("0 101", &pai).await.1.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;
    ua.until_state(srv.http_addr, "waiting for operator").await;
    ua.press('2').await;
    ua.expect_request("BYE", Duration::from_secs(15)).await;
    let (code, _) = http(
        srv.http_addr,
        "POST",
        "/admin/agents/1001/unpause",
        &json,
        b"{}",
    )
    .await;
    assert_eq!(code / 100, 2);
    let at = trunk.local_addr().unwrap().to_string();
    let line = log.line_with(&["outbound INVITE", &at]).await;
    srv.shutdown().await;
    line
}

#[tokio::test]
async fn with_redact_numbers_log_lines_keep_only_the_last_four_digits() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("ivr311=info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    // Default: whole numbers, in the call's lines and in the call-back's INVITE.
    let whole = "+13122000456";
    let invite = caller_called_back(false, whole, &log).await;
    assert!(invite.contains(whole), "{invite}");
    let call = log.line_with(&["waiting for an operator", whole]).await;
    assert!(call.contains(&format!("caller={whole}")), "{call}");

    // Redacted: ***0123 wherever the number was, and the digits before them nowhere.
    let number = "+12122000123";
    let invite = caller_called_back(true, number, &log).await;
    assert!(invite.contains("sip:***0123@"), "{invite}");
    let call = log
        .line_with(&["waiting for an operator", "caller=***0123"])
        .await;
    assert!(call.contains("verified=true"), "{call}");
    log.line_with(&["callback{caller=***0123", "calling the caller back"])
        .await;
    let text = log.text();
    let leaks: Vec<&str> = text.lines().filter(|l| l.contains("2122000123")).collect();
    assert!(leaks.is_empty(), "the number in the log: {leaks:#?}");
}
