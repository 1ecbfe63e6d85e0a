//! Server (and our own) resource use from /proc: CPU seconds (utime + stime), resident memory
//! now and at peak, live threads.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_seconds: f64,
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// VmHWM (peak RSS), KiB.
    pub hwm_kib: u64,
    pub threads: u64,
    /// Time its threads spent runnable but waiting for a CPU (sum of the second field of
    /// `/proc/<pid>/task/*/schedstat`), seconds. Threads that already exited are not counted.
    pub run_delay_seconds: f64,
}

/// Sum of the run-queue wait of every live thread of `pid`, seconds.
fn run_delay(pid: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = dir
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// Read `/proc/<pid>/stat` and `/proc/<pid>/status` (`pid` "self" works too).
pub fn sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_seconds: (utime + stime) as f64 / hz,
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        threads: field("Threads:"),
        run_delay_seconds: run_delay(pid),
    })
}

/// Machine-wide CPU time from the first line of /proc/stat, in clock ticks (all CPUs).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineSample {
    pub total: u64,
    pub idle: u64,
    /// Time in niced user processes (the other sessions' builds run niced).
    pub nice: u64,
    /// Time in softirq (on loopback, much of the packet delivery work).
    pub softirq: u64,
    pub cpus: u64,
    /// UDP datagrams dropped machine-wide for want of receive-buffer room (/proc/net/snmp
    /// `Udp: RcvbufErrors`; every process's sockets).
    pub udp_rcvbuf_errors: u64,
}

fn udp_rcvbuf_errors() -> u64 {
    let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

pub fn machine() -> Option<MachineSample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut lines = stat.lines();
    let f: Vec<u64> = lines
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let cpus = lines.filter(|l| l.starts_with("cpu")).count() as u64;
    Some(MachineSample {
        total: f.iter().take(8).sum(),
        idle: f.get(3)? + f.get(4)?,
        nice: *f.get(1)?,
        softirq: *f.get(6)?,
        cpus,
        udp_rcvbuf_errors: udp_rcvbuf_errors(),
    })
}

/// Between two samples: (busy, niced, softirq) as % of one core.
pub fn machine_use(a: &MachineSample, b: &MachineSample) -> (f64, f64, f64) {
    let total = b.total.saturating_sub(a.total).max(1) as f64;
    let cores = b.cpus.max(1) as f64;
    let pct = |x: u64| 100.0 * cores * x as f64 / total;
    (
        pct(b.total.saturating_sub(a.total) - b.idle.saturating_sub(a.idle)),
        pct(b.nice.saturating_sub(a.nice)),
        pct(b.softirq.saturating_sub(a.softirq)),
    )
}

/// Datagrams the kernel dropped on `pid`'s open UDP sockets for want of receive-buffer room
/// (the `drops` column of /proc/net/udp and udp6): (the socket bound to `sip_port`, all of
/// them). Sockets already closed are not counted.
pub fn udp_drops(pid: &str, sip_port: u16) -> Option<(u64, u64)> {
    let inodes: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let (mut sip, mut all) = (0, 0);
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode), Some(drops)) = (f.get(1), f.get(9), f.get(12)) else {
                continue;
            };
            let Ok(inode) = inode.parse::<u64>() else {
                continue;
            };
            if !inodes.contains(&inode) {
                continue;
            }
            let drops: u64 = drops.parse().unwrap_or(0);
            all += drops;
            let port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if port == Some(sip_port) {
                sip += drops;
            }
        }
    }
    Some((sip, all))
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_reads() {
        let s = sample("self").expect("/proc/self");
        assert!(
            s.rss_kib > 0 && s.hwm_kib >= s.rss_kib && s.threads >= 1,
            "{s:?}"
        );
        assert_eq!(loadavg().split(' ').count(), 3);
    }
}
