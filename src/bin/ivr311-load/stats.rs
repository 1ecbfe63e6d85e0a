//! What one worker counted during one step, merging, the targets of issue 7, and the report
//! (human table and JSON).

use crate::hist::Hist;
use crate::procfs::{MachineSample, ProcSample};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No final response to the INVITE within timer B (64·T1 = 32 s) or before the run ended.
    No200,
    /// A final response ≥ 300.
    Non2xx(u16),
    /// The call was up but not one RTP packet came from the server.
    NoRtp,
    /// No final response to our BYE within timer F (32 s).
    ByeUnanswered,
    /// The server sent BYE before the script hung up.
    ServerBye,
}

#[derive(Clone, Default)]
pub struct Stats {
    pub placed: u64,
    pub ok: u64,
    pub no_200: u64,
    pub non_2xx: BTreeMap<u16, u64>,
    pub no_rtp: u64,
    pub bye_unanswered: u64,
    pub server_bye: u64,
    /// Server BYEs received (answered 200), whatever the call's state.
    pub server_byes_seen: u64,
    /// INVITE (first send) → 200 OK (kernel receive stamp), µs.
    pub setup: Hist,
    /// |inter-arrival − 20 ms| of consecutive server RTP packets of one stream, µs.
    pub pacing: Hist,
    /// Packets arriving < 5 ms after the previous one of their stream.
    pub bursts: u64,
    pub rtp_rx: u64,
    /// Sequence-number gaps (packets the server never sent or that were lost).
    pub rtp_gaps: u64,
    /// Datagrams without a kernel timestamp (timed by our clock instead).
    pub unstamped: u64,
    pub rtp_tx: u64,
    pub send_errors: u64,
    pub digits_sent: u64,
    /// Digits that expected a response and got none within 3 s.
    pub digits_unanswered: u64,
    /// First End packet sent → first marker packet after the key's first packet, µs; a
    /// response that came while the key was still held counts as 0.
    pub end_to_response: Hist,
    /// Responses that arrived before the key's End packet was sent.
    pub answered_before_end: u64,
    /// First packet of the key (start) → first marker packet after it, µs.
    pub press_to_response: Hist,
    /// How late our worker ran each 1 ms slot of the send schedule, µs.
    pub send_lag: Hist,
    /// Times a worker fell ≥ 20 ms behind its schedule.
    pub stalls: u64,
}

impl Stats {
    pub fn fail(&mut self, f: Failure) {
        match f {
            Failure::No200 => self.no_200 += 1,
            Failure::Non2xx(c) => *self.non_2xx.entry(c).or_default() += 1,
            Failure::NoRtp => self.no_rtp += 1,
            Failure::ByeUnanswered => self.bye_unanswered += 1,
            Failure::ServerBye => self.server_bye += 1,
        }
    }

    pub fn failed(&self) -> u64 {
        self.no_200
            + self.non_2xx.values().sum::<u64>()
            + self.no_rtp
            + self.bye_unanswered
            + self.server_bye
    }

    pub fn merge(&mut self, o: &Stats) {
        self.placed += o.placed;
        self.ok += o.ok;
        self.no_200 += o.no_200;
        for (c, n) in &o.non_2xx {
            *self.non_2xx.entry(*c).or_default() += n;
        }
        self.no_rtp += o.no_rtp;
        self.bye_unanswered += o.bye_unanswered;
        self.server_bye += o.server_bye;
        self.server_byes_seen += o.server_byes_seen;
        self.setup.merge(&o.setup);
        self.pacing.merge(&o.pacing);
        self.bursts += o.bursts;
        self.rtp_rx += o.rtp_rx;
        self.rtp_gaps += o.rtp_gaps;
        self.unstamped += o.unstamped;
        self.rtp_tx += o.rtp_tx;
        self.send_errors += o.send_errors;
        self.digits_sent += o.digits_sent;
        self.digits_unanswered += o.digits_unanswered;
        self.end_to_response.merge(&o.end_to_response);
        self.answered_before_end += o.answered_before_end;
        self.press_to_response.merge(&o.press_to_response);
        self.send_lag.merge(&o.send_lag);
        self.stalls += o.stalls;
    }
}

/// Issue 7's per-step targets.
pub struct Targets {
    pub max_failed_fraction: f64,
    pub pacing_p99_us: u64,
    pub setup_p99_us: u64,
    pub digit_p99_us: u64,
}

impl Default for Targets {
    fn default() -> Self {
        Targets {
            max_failed_fraction: 0.001,
            pacing_p99_us: 2_000,
            setup_p99_us: 20_000,
            digit_p99_us: 60_000,
        }
    }
}

/// One finished step with the process samples around it.
pub struct StepReport {
    pub index: usize,
    pub label: String,
    pub seconds: f64,
    pub stats: Stats,
    pub live_at_end: u64,
    /// Calls live on average over the step (sampled every 50 ms).
    pub avg_live: f64,
    pub server: Option<(ProcSample, ProcSample)>,
    pub generator: Option<(ProcSample, ProcSample)>,
    pub loadavg: String,
    /// Machine-wide CPU (/proc/stat) at the start and end of the step.
    pub machine: Option<(MachineSample, MachineSample)>,
    /// The server's RSS before the first call, KiB.
    pub server_idle_rss_kib: Option<u64>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn pct(h: &Hist) -> Value {
    json!({
        "count": h.count(),
        "p50_ms": ms(h.quantile(0.5)),
        "p99_ms": ms(h.quantile(0.99)),
        "p999_ms": ms(h.quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
    })
}

fn pct_line(h: &Hist) -> String {
    if h.count() == 0 {
        return "(none)".into();
    }
    format!(
        "p50 {:.2}  p99 {:.2}  p999 {:.2}  max {:.2} ms  (n={})",
        ms(h.quantile(0.5)),
        ms(h.quantile(0.99)),
        ms(h.quantile(0.999)),
        ms(h.max()),
        h.count()
    )
}

impl StepReport {
    /// Server RSS beyond idle per call live at the end of the step, KiB.
    fn rss_per_call_kib(&self) -> Option<f64> {
        let idle = self.server_idle_rss_kib?;
        let (_, now) = self.server.as_ref()?;
        (self.live_at_end > 0).then(|| (now.rss_kib as f64 - idle as f64) / self.live_at_end as f64)
    }
}

/// Run-queue wait over the step as % of one core's time (threads summed).
fn wait_pct(a: &ProcSample, b: &ProcSample, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    100.0 * (b.run_delay_seconds - a.run_delay_seconds).max(0.0) / seconds
}

fn cpu_pct(a: &ProcSample, b: &ProcSample, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    100.0 * (b.cpu_seconds - a.cpu_seconds) / seconds
}

impl StepReport {
    /// Which targets this step broke (empty: it held).
    pub fn broken(&self, t: &Targets) -> Vec<String> {
        let s = &self.stats;
        let mut out = Vec::new();
        let ended = s.ok + s.failed();
        let frac = if ended == 0 {
            0.0
        } else {
            s.failed() as f64 / ended as f64
        };
        if frac >= t.max_failed_fraction {
            out.push(format!(
                "failed calls {:.2}% ≥ {:.2}%",
                frac * 100.0,
                t.max_failed_fraction * 100.0
            ));
        }
        if ended == 0 && s.placed > 0 {
            out.push("no call ended during the step".into());
        }
        let p = s.pacing.quantile(0.99);
        if p >= t.pacing_p99_us {
            out.push(format!(
                "pacing p99 {:.2} ms ≥ {:.2} ms",
                ms(p),
                ms(t.pacing_p99_us)
            ));
        }
        let p = s.setup.quantile(0.99);
        if p >= t.setup_p99_us {
            out.push(format!(
                "setup p99 {:.2} ms ≥ {:.2} ms",
                ms(p),
                ms(t.setup_p99_us)
            ));
        }
        let p = s.end_to_response.quantile(0.99);
        if p >= t.digit_p99_us {
            out.push(format!(
                "digit→response p99 {:.2} ms ≥ {:.2} ms",
                ms(p),
                ms(t.digit_p99_us)
            ));
        }
        if s.digits_unanswered > 0 {
            out.push(format!("{} digits got no response", s.digits_unanswered));
        }
        out
    }

    pub fn json(&self, t: &Targets) -> Value {
        let s = &self.stats;
        let proc_json = |p: &Option<(ProcSample, ProcSample)>| match p {
            Some((a, b)) => json!({
                "cpu_percent_of_one_core": cpu_pct(a, b, self.seconds),
                "cpu_seconds": b.cpu_seconds - a.cpu_seconds,
                "rss_kib": b.rss_kib,
                "rss_peak_kib": b.hwm_kib,
                "threads": b.threads,
                "waited_for_cpu_percent": wait_pct(a, b, self.seconds),
            }),
            None => Value::Null,
        };
        let broken = self.broken(t);
        json!({
            "step": self.index,
            "load": self.label,
            "seconds": self.seconds,
            "loadavg": self.loadavg,
            "calls": {
                "placed": s.placed,
                "ok": s.ok,
                "failed": s.failed(),
                "failed_by_reason": {
                    "no_200": s.no_200,
                    "non_2xx": s.non_2xx.iter().map(|(c, n)| (c.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                    "no_rtp": s.no_rtp,
                    "bye_unanswered": s.bye_unanswered,
                    "server_bye_first": s.server_bye,
                },
                "server_byes_answered": s.server_byes_seen,
                "live_at_end": self.live_at_end,
                "live_average": self.avg_live,
            },
            "setup": pct(&s.setup),
            "pacing_deviation": pct(&s.pacing),
            "rtp": {
                "received": s.rtp_rx,
                "bursts_under_5ms": s.bursts,
                "sequence_gaps": s.rtp_gaps,
                "unstamped": s.unstamped,
                "sent": s.rtp_tx,
                "send_errors": s.send_errors,
            },
            "digits": {
                "sent": s.digits_sent,
                "unanswered": s.digits_unanswered,
                "end_to_response": pct(&s.end_to_response),
                "answered_before_end": s.answered_before_end,
                "press_to_response": pct(&s.press_to_response),
            },
            "server": proc_json(&self.server),
            "server_cpu_percent_per_live_call": match &self.server {
                Some((a, b)) if self.avg_live >= 1.0 => json!(cpu_pct(a, b, self.seconds) / self.avg_live),
                _ => Value::Null,
            },
            "server_idle_rss_kib": self.server_idle_rss_kib,
            "server_rss_per_live_call_kib": self.rss_per_call_kib(),
            "generator": {
                "process": proc_json(&self.generator),
                "send_lag": pct(&s.send_lag),
                "stalls_over_20ms": s.stalls,
            },
            "machine": self.machine.map(|(a, b)| {
                let (busy, nice, softirq) = crate::procfs::machine_use(&a, &b);
                json!({"cpus": b.cpus, "busy_percent_of_one_core": busy, "niced_percent": nice, "softirq_percent": softirq})
            }),
            "held": broken.is_empty(),
            "broken": broken,
        })
    }

    pub fn table(&self, t: &Targets) -> String {
        let s = &self.stats;
        let mut o = String::new();
        let ended = s.ok + s.failed();
        let frac = if ended == 0 {
            0.0
        } else {
            100.0 * s.failed() as f64 / ended as f64
        };
        o += &format!(
            "== step {}: {}  ({:.1} s, load average {})\n",
            self.index, self.label, self.seconds, self.loadavg
        );
        let codes: Vec<String> = s.non_2xx.iter().map(|(c, n)| format!("{c}×{n}")).collect();
        o += &format!(
            "  calls     placed {}  ok {}  failed {} ({:.3}%): no-200 {}, non-2xx {} [{}], no-RTP {}, BYE-unanswered {}, server-BYE-first {}  | live at end {}, server BYEs answered {}\n",
            s.placed, s.ok, s.failed(), frac, s.no_200, s.non_2xx.values().sum::<u64>(), codes.join(" "),
            s.no_rtp, s.bye_unanswered, s.server_bye, self.live_at_end, s.server_byes_seen
        );
        o += &format!("  setup     INVITE→200        {}\n", pct_line(&s.setup));
        o += &format!("  pacing    |Δt−20ms|         {}\n", pct_line(&s.pacing));
        o += &format!(
            "  rtp       received {}  bursts(<5ms) {}  seq gaps {}  unstamped {}  | sent {}  send errors {}\n",
            s.rtp_rx, s.bursts, s.rtp_gaps, s.unstamped, s.rtp_tx, s.send_errors
        );
        o += &format!(
            "  digits    End→response      {}\n            press→response    {}\n            sent {}  answered before End {}  unanswered {}\n",
            pct_line(&s.end_to_response),
            pct_line(&s.press_to_response),
            s.digits_sent,
            s.answered_before_end,
            s.digits_unanswered
        );
        let proc_line = |p: &Option<(ProcSample, ProcSample)>| {
            match p {
            Some((a, b)) => format!(
                "CPU {:.1}% of one core ({:.2} s), waited for a CPU {:.1}%  RSS {:.1} MiB (peak {:.1} MiB)  threads {}",
                cpu_pct(a, b, self.seconds),
                b.cpu_seconds - a.cpu_seconds,
                wait_pct(a, b, self.seconds),
                b.rss_kib as f64 / 1024.0,
                b.hwm_kib as f64 / 1024.0,
                b.threads
            ),
            None => "(no --server-pid / --spawn-server)".into(),
        }
        };
        let per_call = self
            .rss_per_call_kib()
            .map(|k| format!("  ({k:.1} KiB per live call over idle)"))
            .unwrap_or_default();
        let cpu_per_call = match &self.server {
            Some((a, b)) if self.avg_live >= 1.0 => format!(
                "  {:.3}% of a core per live call (avg {:.0} live)",
                cpu_pct(a, b, self.seconds) / self.avg_live,
                self.avg_live
            ),
            _ => String::new(),
        };
        o += &format!(
            "  server    {}{per_call}{cpu_per_call}\n",
            proc_line(&self.server)
        );
        o += &format!(
            "  loadgen   {}  send lag p99 {:.2} ms max {:.2} ms  stalls {}\n",
            proc_line(&self.generator),
            ms(s.send_lag.quantile(0.99)),
            ms(s.send_lag.max()),
            s.stalls
        );
        if let Some((a, b)) = &self.machine {
            let (busy, nice, softirq) = crate::procfs::machine_use(a, b);
            o += &format!(
                "  machine   {} CPUs busy {:.0}% of one core: niced processes (other sessions' builds) {:.0}%, softirq {:.0}%\n",
                b.cpus, busy, nice, softirq
            );
        }
        let broken = self.broken(t);
        if broken.is_empty() {
            o += "  targets   HELD (failed < 0.1%, pacing p99 < 2 ms, setup p99 < 20 ms, digit p99 < 60 ms)\n";
        } else {
            o += &format!("  targets   BROKEN: {}\n", broken.join("; "));
        }
        o
    }
}
