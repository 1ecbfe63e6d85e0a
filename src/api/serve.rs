//! Serving the API over HTTP/1.1 (hyper) with bounds a client cannot stretch:
//!
//! * **Header-read timeout** (`http.header_read_timeout_seconds`): a request's header must
//!   arrive in full within it, counted from the connection opening or from the previous
//!   response; a client that sends half a header, or holds a kept-alive connection with
//!   nothing more to ask, is disconnected.
//! * **Idle timeout** (`http.idle_timeout_seconds`): a connection on which no byte moves either
//!   way for that long (a body that stops arriving, a response nobody reads) is closed.
//! * **Connection cap** (`http.max_connections`): past it a new connection is answered
//!   `503 Service Unavailable` with `Retry-After` and closed at once, so the connections already
//!   open (a monitor, an admin) keep working and the timeouts above free slots.
//!
//! Each connection is a task on the server's [`TaskTracker`]; on shutdown, connections finish
//! the request in progress and close. A connection upgraded to a WebSocket (`/sip`) leaves
//! these bounds and its slot: it is a SIP connection from then on, bounded as one
//! ([`super::sip_ws`]).

use crate::config::HttpConfig;
use crate::heartbeat::Heartbeat;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// The answer to a connection over `http.max_connections`.
const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Content-Type: application/json\r\nContent-Length: 54\r\nConnection: close\r\n\r\n\
{\"error\":\"too many HTTP connections; try again later\"}";

/// How often, at most, refused connections are logged (with the count since the last line).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The bounds of [`HttpConfig`] as durations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpLimits {
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
}

impl From<&HttpConfig> for HttpLimits {
    fn from(c: &HttpConfig) -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(c.header_read_timeout_seconds.max(1)),
            idle_timeout: Duration::from_secs(c.idle_timeout_seconds.max(1)),
            max_connections: c.max_connections.max(1),
        }
    }
}

/// Accepts connections on `listener` and serves `router` on each until `cancel`.
pub(crate) async fn run(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused: u64 = 0;
    let mut last_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refuse(&stream);
            refused += 1;
            let now = Instant::now();
            if last_log.is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY) {
                warn!(
                    %remote,
                    refused,
                    max = limits.max_connections,
                    "HTTP connections at their limit; refusing new ones with 503"
                );
                last_log = Some(now);
                refused = 0;
            }
            continue;
        };
        let router = router.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            serve_connection(stream, remote, router, limits, cancel).await;
            drop(permit);
        });
    }
}

/// Answer 503 without waiting (the socket is new: its send buffer is empty) and close.
fn refuse(stream: &TcpStream) {
    let _ = stream.try_write(OVERLOADED);
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    router: Router,
    limits: HttpLimits,
    cancel: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Heartbeat::new(Instant::now()));
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let inner = hyper_util::service::TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        req.extensions_mut().insert(ConnectInfo(remote));
        hyper::service::Service::call(&inner, req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    // Upgrades (`/sip`'s WebSocket) take the connection out of hyper's hands, and out of the
    // header and idle timeouts below: the upgraded socket is SIP's, with SIP's bounds.
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let idle_left = limits
            .idle_timeout
            .saturating_sub(activity.age(Instant::now()));
        if idle_left.is_zero() {
            debug!(%remote, "HTTP connection idle; closing");
            return;
        }
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%remote, error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = cancel.cancelled(), if !stopping => {
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
            _ = tokio::time::sleep(idle_left) => {}
        }
    }
}

/// A stream that notes when bytes last moved either way.
struct Watched {
    inner: TcpStream,
    activity: Arc<Heartbeat>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.beat(Instant::now());
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.beat(Instant::now());
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.beat(Instant::now());
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overload_answer_is_well_formed() {
        let text = std::str::from_utf8(OVERLOADED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
