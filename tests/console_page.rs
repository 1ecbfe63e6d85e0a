//! The console page in headless Chromium (Debian's `chromium` and `chromium-driver`), driven
//! over WebDriver with plain HTTP: log in, the state bar, a SIP caller pressing 0 rings in the
//! page with their number and earlier requests, Decline stops the desk phone ringing, Spanish,
//! and a request filed from the form is found over Open311. The call's audio stays on a SIP
//! test phone here (a desk phone operator); browser audio is tested with the WebRTC harness.
//!
//! On failure the page's screenshot is saved to `target/console-page-failure.png`.

mod common;

use common::*;
use ivr311::dispatch::tickets::NewTicket;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The element key of WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One JSON request to chromedriver: the answer's `value` (within 60 s).
async fn wd(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(60), wd_once(addr, method, path, body))
        .await
        .unwrap_or_else(|_| panic!("WebDriver {method} {path} got no answer"))
}

async fn wd_once(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // Read the head, then exactly Content-Length bytes (the driver may keep the connection).
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 65536];
    let (head_len, length) = loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "WebDriver closed the connection early");
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..i]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, length);
        }
    };
    while raw.len() < head_len + length {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "WebDriver closed the connection early");
        raw.extend_from_slice(&buf[..n]);
    }
    let v: Value = serde_json::from_slice(&raw[head_len..head_len + length]).unwrap_or(Value::Null);
    v["value"].clone()
}

/// chromedriver with one headless Chromium session; both end when this is dropped.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian: apt-get install chromium chromium-driver)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--window-size=1400,900", "--disable-dev-shm-usage"]
            }
        }}});
        let v = wd(addr, "POST", "/session", Some(caps)).await;
        let session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_owned();
        Browser {
            driver,
            addr,
            session,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        wd(self.addr, method, &path, body).await
    }

    async fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})))
            .await;
    }

    async fn type_in(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// The text of `css`, once `ok` says it is what the test waits for (within 10 s).
    async fn text_until(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let script = format!(
            "const e = document.querySelector({}); return e && !e.closest('[hidden]') ? e.textContent : null",
            json!(css)
        );
        loop {
            let v = self.js(&script).await;
            let text = v.as_str().unwrap_or("").to_owned();
            if ok(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed what was expected; last {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Blocking here is fine: the test is over.
            if let Some(png) = screenshot(self.addr, &self.session) {
                let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target/console-page-failure.png");
                let _ = std::fs::write(&path, png);
                eprintln!("screenshot of the page: {}", path.display());
            }
        }
        // Ending the session closes Chromium; then the driver goes.
        blocking(self.addr, "DELETE", &format!("/session/{}", self.session));
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The page's screenshot as PNG bytes, over a blocking connection.
fn screenshot(addr: SocketAddr, session: &str) -> Option<Vec<u8>> {
    let v = blocking(addr, "GET", &format!("/session/{session}/screenshot"))?;
    base64_decode::decode(v["value"].as_str()?)
}

/// One WebDriver request over a blocking connection (for `Drop`): the answer's JSON.
fn blocking(addr: SocketAddr, method: &str, path: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    // The driver may keep the connection open: read until the JSON body parses.
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 65536];
    let v: Value = loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            if let Ok(v) = serde_json::from_str(body.trim()) {
                break v;
            }
        }
    };
    Some(v)
}

/// Standard base64, as WebDriver sends screenshots.
mod base64_decode {
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        let val = |c: u8| -> Option<u32> {
            Some(match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return None,
            } as u32)
        };
        let bytes: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            let mut len = 0;
            for &c in chunk {
                if c == b'=' {
                    break;
                }
                n = (n << 6) | val(c)?;
                len += 1;
            }
            n <<= 6 * (4 - len);
            let b = n.to_be_bytes();
            out.extend_from_slice(&b[1..len.max(1)]);
        }
        Some(out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_on_a_desk_phone_works_a_call_from_the_page() {
    let srv = start_server(agents_config(&["1001"], 60, 30)).await;
    srv.tickets
        .file(NewTicket {
            service_code: "streetlight".into(),
            service_name: "Streetlight out".into(),
            phone: Some("+15550001111".into()),
            ..NewTicket::default()
        })
        .await
        .unwrap();
    let phone = TestAgent::login(srv.sip_addr, "1001").await;
    let b = Browser::start().await;
    b.go(&format!("http://{}/console", srv.http_addr)).await;

    // A wrong password is refused in the page; the right one opens the console.
    b.type_in("#login-agent", "1001").await;
    b.type_in("#login-password", "nope").await;
    b.click("#login-form button").await;
    b.text_until("#login-error", |t| t.contains("Wrong")).await;
    b.js("document.getElementById('login-password').value = ''")
        .await;
    b.type_in("#login-password", "pw1001").await;
    b.click("#login-form button").await;
    b.text_until("#state", |t| t == "Ready").await;

    // Not ready, then Ready again, from the state bar.
    b.click("#btn-notready").await;
    b.text_until("#state", |t| t.starts_with("Not ready")).await;
    assert_eq!(agent_state(srv.http_addr, "1001").await, "paused");
    b.click("#btn-ready").await;
    b.text_until("#state", |t| t == "Ready").await;

    // A caller presses 0: the page rings with who they are and what they asked for before.
    let mut caller = caller_pressing(srv.sip_addr, "110").await;
    let inv = phone.request("INVITE", Duration::from_secs(10)).await;
    phone.reply(&inv, 180, "Ringing", None).await;
    b.text_until("#banner-number", |t| t == "+15550001111")
        .await;
    b.text_until("#c-path", |t| t == "Operator").await;
    b.text_until("#history", |t| t.contains("Streetlight out"))
        .await;
    // In Spanish.
    b.click("#lang-es").await;
    b.text_until("#btn-decline", |t| t == "Rechazar").await;
    b.click("#lang-en").await;
    // Decline: the desk phone stops ringing; the operator rests as after a missed call.
    b.click("#btn-decline").await;
    phone.request("CANCEL", Duration::from_secs(5)).await;
    b.text_until("#state", |t| t.starts_with("Missed call pause"))
        .await;
    assert!(
        b.js("return document.getElementById('banner').hidden")
            .await
            == json!(true)
    );

    // Back to ready: offered again, answered on the phone; a request filed from the form.
    b.click("#btn-ready").await;
    let inv = phone.request("INVITE", Duration::from_secs(10)).await;
    phone.reply(&inv, 200, "OK", Some(phone.answer_sdp())).await;
    phone.request("ACK", Duration::from_secs(3)).await;
    b.text_until("#state", |t| t == "On a call").await;
    b.js("document.getElementById('t-service').value = 'pothole'")
        .await;
    b.type_in("#t-address", "100 Main St").await;
    b.type_in("#t-zip", "10458").await;
    b.click("#ticket-form button[type=submit]").await;
    let shown = b
        .text_until("#filed-number", |t| t.len() == 9)
        .await
        .replace(' ', "");
    let (status, body) = common::http(
        srv.http_addr,
        "GET",
        &format!("/open311/v2/requests/{shown}.json"),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("100 Main St"), "{body}");

    // Hang up from the page: the caller hears BYE and the page shows wrap-up.
    b.click("#btn-hangup").await;
    caller.expect_request("BYE", Duration::from_secs(5)).await;
    b.text_until("#state", |t| t.starts_with("Wrap-up")).await;
    drop(b);
    srv.shutdown().await;
}
