//! The RTP port pool: one even port per call from `--rtp-ports`, bound when taken and returned
//! when the call's [`RtpPort`] is dropped.
//!
//! Each port is drawn at random from the free ones. Handed out in order, the next call's port
//! was the last one's plus two: anyone who made one call knew where the next caller's media
//! would go, and could send to it first. (The latch admits only the caller's own addresses
//! as well, see [`crate::media::rtp::LatchScope`]; a port nobody can predict keeps a stranger
//! from even trying.)
//!
//! A port's socket is a plain non-blocking std socket, not registered with the tokio reactor:
//! the media clock reads and writes it on its own schedule, and a registered socket would wake
//! the reactor for every packet that arrives (bridged calls, call-back legs included, are
//! relayed by the clock too).

use crate::sockopt::{set_dscp, Dscp};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tracing::{debug, warn};

/// An inclusive port range (`--rtp-ports LO-HI`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

/// Parse `LO-HI` (the `--rtp-ports` flag).
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("expected LO-HI, got {s:?}"))?;
    let lo: u16 = lo.trim().parse().map_err(|_| format!("bad port {lo:?}"))?;
    let hi: u16 = hi.trim().parse().map_err(|_| format!("bad port {hi:?}"))?;
    if lo == 0 || hi < lo {
        return Err(format!("bad range {lo}-{hi}: need 0 < LO <= HI"));
    }
    Ok(PortRange { lo, hi })
}

/// The RTP port pool: one even port per call from `--rtp-ports`, returned when the call ends.
#[derive(Debug)]
pub struct PortPool {
    /// Free ports, in no order that matters: [`PortPool::allocate`] draws at random.
    free: Mutex<Vec<u16>>,
    bind_ip: IpAddr,
    /// How every port's packets are marked (`qos.rtp_dscp`); 0 leaves them unmarked.
    dscp: Dscp,
    /// A marking failure was logged (once: the cause is the same for every port).
    dscp_warned: AtomicBool,
}

/// A bound RTP port; the port goes back to the pool when this is dropped.
pub struct RtpPort {
    /// Non-blocking.
    pub socket: std::net::UdpSocket,
    pub port: u16,
    pool: Arc<PortPool>,
}

impl RtpPort {
    /// Drop every datagram waiting on the socket; how many there were. For a port nobody read
    /// while its phone rang: the media clock empties a leg's port as a bridge to it starts,
    /// and a call-back its caller's port as they answer (see the clock's `tick`).
    pub(crate) fn discard_queued(&self) -> usize {
        let mut buf = [0u8; 2048];
        let mut n = 0;
        // Non-blocking: stops at the first WouldBlock (or any other error).
        while self.socket.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

impl Drop for RtpPort {
    fn drop(&mut self) {
        if let Ok(mut f) = self.pool.free.lock() {
            f.push(self.port);
        }
    }
}

impl PortPool {
    /// A pool whose packets are marked EF (the `qos.rtp_dscp` default).
    #[cfg(test)]
    pub(crate) fn new(range: PortRange, bind_ip: IpAddr) -> Arc<Self> {
        Self::with_dscp(range, bind_ip, Dscp::EF)
    }

    /// A pool whose packets are marked `dscp` (0: unmarked).
    pub(crate) fn with_dscp(range: PortRange, bind_ip: IpAddr, dscp: Dscp) -> Arc<Self> {
        // Even ports only (RFC 3550 §11), leaving odd ones for RTCP.
        let first = range.lo + (range.lo % 2);
        let free = (first..=range.hi).step_by(2).collect();
        Arc::new(PortPool {
            free: Mutex::new(free),
            bind_ip,
            dscp,
            dscp_warned: AtomicBool::new(false),
        })
    }

    pub(crate) fn available(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Take a free port, drawn at random, and bind it; ports in use by another program are
    /// skipped (another is drawn) and stay in the pool, as they may be free later.
    pub(crate) fn allocate(self: &Arc<Self>) -> Option<RtpPort> {
        use rand::Rng;
        for _ in 0..64 {
            let port = {
                let mut free = self.free.lock().ok()?;
                if free.is_empty() {
                    return None;
                }
                let i = rand::rng().random_range(0..free.len());
                free.swap_remove(i)
            };
            let std = match std::net::UdpSocket::bind(SocketAddr::new(self.bind_ip, port)) {
                Ok(s) => s,
                Err(e) => {
                    debug!(port, error = %e, "rtp port busy; drawing another");
                    if let Ok(mut f) = self.free.lock() {
                        f.push(port);
                    }
                    continue;
                }
            };
            if std.set_nonblocking(true).is_err() {
                continue;
            }
            if self.dscp.0 != 0 {
                if let Err(e) = set_dscp(&std, self.bind_ip.is_ipv6(), self.dscp) {
                    if !self.dscp_warned.swap(true, Ordering::Relaxed) {
                        warn!(error = %e, dscp = self.dscp.0, "cannot mark RTP packets; sent unmarked");
                    }
                }
            }
            return Some(RtpPort {
                socket: std,
                port,
                pool: self.clone(),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockopt::dscp_of;

    #[test]
    fn port_ranges() {
        assert_eq!(
            parse_port_range("10000-20000"),
            Ok(PortRange {
                lo: 10000,
                hi: 20000
            })
        );
        assert!(parse_port_range("20000-10000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("abc").is_err());
    }

    fn range() -> PortRange {
        let lo = 50000 + 2 * (rand::random::<u16>() % 4000);
        PortRange { lo, hi: lo + 40 }
    }

    #[test]
    fn rtp_is_marked_ef_by_default_and_left_unmarked_with_dscp_0() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let p = PortPool::new(range(), ip).allocate().expect("a free port");
        assert_eq!(dscp_of(&p.socket), 46);
        let p = PortPool::with_dscp(range(), ip, Dscp(0))
            .allocate()
            .expect("a free port");
        assert_eq!(dscp_of(&p.socket), 0);
    }

    #[test]
    fn what_waits_on_a_port_is_discarded_and_counted() {
        let p = PortPool::new(range(), "127.0.0.1".parse().unwrap())
            .allocate()
            .expect("a free port");
        let to = SocketAddr::new("127.0.0.1".parse().unwrap(), p.port);
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..5 {
            s.send_to(&[0x80; 172], to).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(p.discard_queued(), 5);
        assert_eq!(p.discard_queued(), 0);
    }

    /// Ports are drawn at random: calls one after another do not get ports in order (which
    /// told anyone with one call where the next caller's media would go), and every port of
    /// the range is used over time.
    #[test]
    fn ports_are_drawn_at_random_from_the_whole_range() {
        let r = range();
        let pool = PortPool::new(r, "127.0.0.1".parse().unwrap());
        let mut seen = std::collections::HashSet::new();
        let mut in_order = 0;
        let mut last: Option<u16> = None;
        for _ in 0..200 {
            // One call at a time: each port goes back before the next call.
            let p = pool.allocate().expect("a free port");
            assert!(
                p.port.is_multiple_of(2) && (r.lo..=r.hi).contains(&p.port),
                "{}",
                p.port
            );
            if last.is_some_and(|l| p.port == l + 2) {
                in_order += 1;
            }
            last = Some(p.port);
            seen.insert(p.port);
        }
        // 21 even ports: in order, 199 of 200 would follow the last; at random about 1 in 21.
        assert!(
            in_order < 40,
            "{in_order} of 200 calls got the port after the last"
        );
        assert!(seen.len() > 15, "only {} of 21 ports used", seen.len());
        assert_eq!(pool.available(), 21);
    }
}
