//! `--spawn-server`: run the server binary on free loopback ports with a temporary database,
//! recordings directory and log file, and stop it at the end.

use anyhow::Context;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    bin: PathBuf,
    pub sip: SocketAddr,
    dir: PathBuf,
}

/// A port free for both UDP and TCP on loopback (the server binds SIP on both).
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let u = UdpSocket::bind("127.0.0.1:0")?;
        let port = u.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port")
}

impl Server {
    /// `extra_config`: more YAML for the server's config file (top-level keys other than
    /// `storage` and `limits`), `limits`: more keys under `limits:` (indented lines).
    pub fn start(
        bin: &Option<PathBuf>,
        menu: &Path,
        prompts: &Path,
        limits: &str,
        extra_config: &str,
        rtp_ports: Option<&str>,
    ) -> anyhow::Result<Server> {
        let bin = match bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("own binary has no directory")?
                .join("ivr311"),
        };
        let dir = std::env::temp_dir().join(format!("ivr311-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "storage:\n  recordings_dir: {:?}\nlimits:\n  drain_seconds: 1\n{limits}{extra_config}",
                dir.join("recordings")
            ),
        )?;
        let (sip_port, http_port) = (free_port()?, free_port()?);
        let sip: SocketAddr = ([127, 0, 0, 1], sip_port).into();
        let http: SocketAddr = ([127, 0, 0, 1], http_port).into();
        let log = std::fs::File::create(dir.join("server.log"))?;
        let mut cmd = Command::new(&bin);
        if let Some(r) = rtp_ports {
            cmd.arg("serve").arg("--rtp-ports").arg(r);
        } else {
            cmd.arg("serve");
        }
        let child = cmd
            .arg("--sip")
            .arg(sip.to_string())
            .arg("--http")
            .arg(http.to_string())
            .arg("--db")
            .arg(dir.join("tickets.db"))
            .arg("--menu")
            .arg(menu)
            .arg("--prompts")
            .arg(prompts)
            .arg("--config")
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("IVR311_LOAD_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build the server with `cargo build --release -p ivr311`, or \
                     name it with --server-bin)",
                    bin.display()
                )
            })?;
        let mut s = Server {
            child,
            bin: bin.clone(),
            sip,
            dir,
        };
        let t = Instant::now();
        while TcpStream::connect(http).is_err() {
            if let Ok(Some(status)) = s.child.try_wait() {
                anyhow::bail!(
                    "{} exited ({status}); see {}",
                    bin.display(),
                    s.dir.join("server.log").display()
                );
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "server did not come up within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "ivr311-load: spawned {} pid {} (SIP {sip}, HTTP {http}, files in {})",
            bin.display(),
            s.pid(),
            s.dir.display()
        );
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after 5 s; count the tickets filed (with `ivr311 tickets list`);
    /// remove the temporary files (kept, with the server's log, when the environment has
    /// `IVR311_LOAD_KEEP_SERVER_DIR`).
    pub fn stop(mut self) -> Option<usize> {
        self.terminate();
        let out = Command::new(&self.bin)
            .args(["tickets", "list", "--json", "--limit", "4000000000", "--db"])
            .arg(self.dir.join("tickets.db"))
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if std::env::var_os("IVR311_LOAD_KEEP_SERVER_DIR").is_some() {
            eprintln!("ivr311-load: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array().map(Vec::len)
    }

    fn terminate(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
