//! A small WebDriver client for tests in a real browser: headless Chromium (Debian's `chromium`
//! and `chromium-driver`, which `scripts/test` installs when missing) driven through
//! `chromedriver` on a free loopback port.
//!
//! ```ignore
//! let browser = Browser::start(BrowserOptions { fake_audio: Some(wav) }).await;
//! browser.goto(&format!("http://{}/console", srv.http_addr)).await;
//! browser.execute("document.querySelector('#ready').click()", vec![]).await;
//! browser.wait_for("the agent is ready", "return window.state === 'ready'", Duration::from_secs(5)).await;
//! browser.screenshot("ready").await;
//! ```
//!
//! - [`Browser::start`]: chromedriver on a free port, and a new session of Chromium with a new
//!   empty profile, fake media devices (the microphone plays [`BrowserOptions::fake_audio`],
//!   permission prompts are granted), loopback allowed for WebRTC, and the flags that keep it
//!   off the network (no QUIC, no background networking, no component updates, no sync).
//! - [`Browser::goto`], [`Browser::click`], [`Browser::type_in`], [`Browser::text_until`]
//!   (an element's text once it is what the test waits for), [`Browser::execute`] (a
//!   script's `return` value as JSON),
//!   [`Browser::wait_for`] (polls a script until it returns something truthy, with a deadline;
//!   on time-out saves a screenshot and panics with what the page said), and
//!   [`Browser::screenshot`] (PNG under `target/tmp/browser-shots/`).
//! - A test that panics with a browser open gets a screenshot of the page as it was
//!   (`<name>-panic.png`); the session and chromedriver are ended when the [`Browser`] drops.
//!
//! `IVR311_CHROMIUM` and `IVR311_CHROMEDRIVER` name other binaries than `/usr/bin/chromium` and
//! `/usr/bin/chromedriver`.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The element key of WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// What the browser is started with.
#[derive(Debug, Clone, Default)]
pub struct BrowserOptions {
    /// A WAV file the fake microphone plays (looped): `--use-file-for-fake-audio-capture`.
    /// Without one, Chromium's fake microphone beeps.
    pub fake_audio: Option<PathBuf>,
}

/// One Chromium session under its own chromedriver.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    /// Names screenshots (the test's thread name, which is the test's name).
    name: String,
    _profile: TempDir,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where screenshots go.
pub fn shots_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-shots")
}

fn binary(var: &str, default: &str) -> String {
    let path = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    assert!(
        Path::new(&path).exists(),
        "{path} is missing: install Debian's chromium and chromium-driver (scripts/test does), \
         or set {var}"
    );
    path
}

/// One WebDriver request and its JSON `value` (blocking: loopback, small bodies).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, String> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body.as_bytes()))
        .map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open whatever `Connection` says: read the head, then
    // as much body as it announces (or chunks up to the last).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let body = loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let body = &raw[end + 4..];
        if head.contains("transfer-encoding: chunked") {
            if body.ends_with(b"0\r\n\r\n") {
                break dechunk(&String::from_utf8_lossy(body));
            }
            continue;
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if body.len() >= len {
            break String::from_utf8_lossy(&body[..len]).into_owned();
        }
    };
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if let Some(err) = value.get("error").and_then(Value::as_str) {
        let msg = value.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(format!("{err}: {msg}"));
    }
    Ok(value)
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((len, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

impl Browser {
    /// Start chromedriver and a new Chromium session (see the module docs).
    pub async fn start(opts: BrowserOptions) -> Browser {
        let chromium = binary("IVR311_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = binary("IVR311_CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = TempDir(
            std::env::temp_dir().join(format!("ivr311-chromium-{}", rand::random::<u64>())),
        );
        std::fs::create_dir_all(&profile.0).unwrap();
        let name = std::thread::current()
            .name()
            .unwrap_or("browser")
            .replace("::", "-");
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            name,
            _profile: profile,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ready = browser
                .call("GET", "/status".to_owned(), None)
                .await
                .ok()
                .and_then(|v| v.get("ready").and_then(Value::as_bool));
            if ready == Some(true) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not come up on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--user-data-dir={}", browser._profile.0.display()),
            "--use-fake-ui-for-media-stream".to_owned(),
            "--use-fake-device-for-media-stream".to_owned(),
            "--autoplay-policy=no-user-gesture-required".to_owned(),
            // WebRTC gathers no loopback candidates unless told to; the tests stay on it.
            "--allow-loopback-in-peer-connection".to_owned(),
            "--window-size=1280,900".to_owned(),
        ];
        if let Some(wav) = &opts.fake_audio {
            args.push(format!(
                "--use-file-for-fake-audio-capture={}",
                wav.display()
            ));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let v = browser
            .call("POST", "/session".to_owned(), Some(caps))
            .await
            .unwrap_or_else(|e| panic!("no Chromium session: {e}"));
        browser.session = v["sessionId"].as_str().expect("a session id").to_owned();
        browser
    }

    async fn call(&self, method: &str, path: String, body: Option<Value>) -> Result<Value, String> {
        let (addr, method) = (self.addr, method.to_owned());
        tokio::task::spawn_blocking(move || request(addr, &method, &path, body.as_ref()))
            .await
            .map_err(|e| e.to_string())?
    }

    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Load `url` (returns when the page has loaded).
    pub async fn goto(&self, url: &str) {
        if let Err(e) = self
            .call("POST", self.path("/url"), Some(json!({ "url": url })))
            .await
        {
            self.fail(&format!("cannot load {url}: {e}")).await;
        }
    }

    /// Run `script` (a function body: `arguments[i]` are `args`) in the page; what it
    /// `return`s, as JSON. A script that throws fails the test (with a screenshot).
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        match self.try_execute(script, args).await {
            Ok(v) => v,
            Err(e) => self.fail(&format!("script failed: {e}\n{script}")).await,
        }
    }

    /// [`Browser::execute`], with the error returned rather than failing.
    pub async fn try_execute(&self, script: &str, args: Vec<Value>) -> Result<Value, String> {
        self.call(
            "POST",
            self.path("/execute/sync"),
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Poll `script` every 100 ms until it returns something truthy (not `null`, `false`,
    /// `0` or `""`), and return that; after `within`, save a screenshot and fail the test
    /// naming `what` and the script's last answer.
    pub async fn wait_for(&self, what: &str, script: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = self.try_execute(script, vec![]).await;
            let truthy = match &last {
                Ok(Value::Null | Value::Bool(false)) => false,
                Ok(Value::Number(n)) => n.as_f64() != Some(0.0),
                Ok(Value::String(s)) => !s.is_empty(),
                Ok(_) => true,
                Err(_) => false,
            };
            if truthy {
                return last.unwrap();
            }
            if tokio::time::Instant::now() >= deadline {
                self.fail(&format!("{what}: not within {within:?} (last: {last:?})"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The WebDriver id of the element `css` selects (fails the test when there is none).
    pub async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                "POST",
                self.path("/element"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        match v.as_ref().ok().and_then(|v| v[ELEMENT].as_str()) {
            Some(id) => id.to_owned(),
            None => self.fail(&format!("no element {css}: {v:?}")).await,
        }
    }

    /// Click `css` as a user does (a user gesture to the page).
    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        if let Err(err) = self
            .call(
                "POST",
                self.path(&format!("/element/{e}/click")),
                Some(json!({})),
            )
            .await
        {
            self.fail(&format!("cannot click {css}: {err}")).await;
        }
    }

    /// Type `text` into `css`, key by key.
    pub async fn type_in(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        if let Err(err) = self
            .call(
                "POST",
                self.path(&format!("/element/{e}/value")),
                Some(json!({ "text": text })),
            )
            .await
        {
            self.fail(&format!("cannot type into {css}: {err}")).await;
        }
    }

    /// The text of `css` (shown: not inside anything `hidden`), once `ok` says it is what the
    /// test waits for (within 10 s; else a screenshot and the test fails).
    pub async fn text_until(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let script = format!(
            "const e = document.querySelector({}); return e && !e.closest('[hidden]') ? e.textContent : null",
            json!(css)
        );
        loop {
            let v = self.try_execute(&script, vec![]).await;
            let text = v
                .as_ref()
                .ok()
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if ok(&text) {
                return text;
            }
            if tokio::time::Instant::now() >= deadline {
                self.fail(&format!("{css} never showed what was expected; last {v:?}"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resize the browser's window (for a screenshot of a whole page).
    pub async fn resize(&self, width: u32, height: u32) {
        if let Err(e) = self
            .call(
                "POST",
                self.path("/window/rect"),
                Some(json!({ "width": width, "height": height })),
            )
            .await
        {
            self.fail(&format!("cannot resize the window: {e}")).await;
        }
    }

    /// Save a PNG of the page as `<test>-<label>.png` under [`shots_dir`]; its path.
    pub async fn screenshot(&self, label: &str) -> PathBuf {
        let v = self
            .call("GET", self.path("/screenshot"), None)
            .await
            .unwrap_or_else(|e| panic!("screenshot failed: {e}"));
        save_png(&self.name, label, &v)
    }

    /// Screenshot, then panic with `msg`.
    async fn fail(&self, msg: &str) -> ! {
        let shot = self.call("GET", self.path("/screenshot"), None).await;
        let saved = shot
            .map(|v| save_png(&self.name, "failed", &v).display().to_string())
            .unwrap_or_else(|e| format!("(no screenshot: {e})"));
        panic!("{msg}\nscreenshot: {saved}");
    }
}

fn save_png(name: &str, label: &str, v: &Value) -> PathBuf {
    use base64_decode as b64;
    let png = b64(v.as_str().unwrap_or_default());
    let dir = shots_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}-{label}.png"));
    let _ = std::fs::write(&path, png);
    path
}

/// Standard base64 (WebDriver screenshots), without a dependency for it.
fn base64_decode(s: &str) -> Vec<u8> {
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
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            if std::thread::panicking() {
                if let Ok(v) = request(self.addr, "GET", &self.path("/screenshot"), None) {
                    save_png(&self.name, "panic", &v);
                }
            }
            let _ = request(self.addr, "DELETE", &self.path(""), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Write a WAV of a sine at `freq` Hz (`seconds` long, 48 kHz mono 16-bit, half scale) for
/// [`BrowserOptions::fake_audio`].
pub fn tone_wav(path: &Path, freq: f32, seconds: u32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..48_000 * seconds {
        let t = i as f32 / 48_000.0;
        let s = (t * freq * std::f32::consts::TAU).sin() * 16_000.0;
        w.write_sample(s as i16).unwrap();
    }
    w.finalize().unwrap();
}
