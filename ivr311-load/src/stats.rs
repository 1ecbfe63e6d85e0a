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
    /// Operator script: no audio from an operator within the script's wait after the key
    /// into the queue.
    NotBridged,
}

/// One direction of bridged audio, as the phone at its end heard it: every packet carries the
/// far phone's mark and send time ([`crate::payload`]), so the relay's share is measured apart
/// from the sender's own lateness.
#[derive(Clone, Default)]
pub struct Heard {
    /// |inter-arrival − 20 ms|, µs.
    pub pacing: Hist,
    /// What the relay added to the spacing: |Δreceive − Δsend| of consecutive packets (the
    /// pacing figure without the far phone's own send jitter), µs.
    pub jitter: Hist,
    /// The far phone's send → this phone's kernel receive stamp, µs.
    pub transit: Hist,
    pub rx: u64,
    /// Packets less than 5 ms after the one before.
    pub bursts: u64,
    /// Packets missing from the sequence.
    pub gaps: u64,
    /// Packets from the server that carried no mark of the far phone.
    pub foreign: u64,
    /// Packets this phone's socket dropped (receive buffer full), kernel's count.
    pub dropped_here: u64,
}

/// The last packet one phone heard from the far one.
#[derive(Clone, Copy, Default)]
pub struct LastHeard {
    /// Packets heard so far.
    pub rx: u64,
    /// Kernel receive stamp and the far phone's send time, ns.
    pub rx_ns: i64,
    pub sent_ns: i64,
    pub seq: u16,
}

impl Heard {
    /// Count a marked packet with sequence number `seq`, sent at `sent` and received at
    /// `stamp` (ns), after `last` (updated).
    pub fn packet(&mut self, last: &mut LastHeard, stamp: i64, sent: i64, seq: u16) {
        if last.rx > 0 {
            let d = stamp - last.rx_ns;
            self.pacing.record((d - 20_000_000).unsigned_abs() / 1000);
            self.jitter
                .record((d - (sent - last.sent_ns)).unsigned_abs() / 1000);
            if d < 5_000_000 {
                self.bursts += 1;
            }
            let gap = seq.wrapping_sub(last.seq.wrapping_add(1));
            if gap != 0 && gap < 1000 {
                self.gaps += u64::from(gap);
            }
        }
        self.transit.record(((stamp - sent).max(0) / 1000) as u64);
        self.rx += 1;
        *last = LastHeard {
            rx: last.rx + 1,
            rx_ns: stamp,
            sent_ns: sent,
            seq,
        };
    }

    pub fn merge(&mut self, o: &Heard) {
        self.pacing.merge(&o.pacing);
        self.jitter.merge(&o.jitter);
        self.transit.merge(&o.transit);
        self.rx += o.rx;
        self.bursts += o.bursts;
        self.gaps += o.gaps;
        self.foreign += o.foreign;
        self.dropped_here += o.dropped_here;
    }
}

/// The operator script's callers and the generator's agents (all zero for other scripts).
#[derive(Clone, Default)]
pub struct BridgeStats {
    // ---- callers -------------------------------------------------------------------------
    /// Calls whose caller heard an operator (first agent packet through the server).
    pub bridged: u64,
    /// Key into the queue (its first packet sent) → first agent packet at the caller, µs.
    pub press_to_agent_audio: Hist,
    /// The agent audio the callers receive through the server. `foreign`: packets from the
    /// server after the bridge that carried no agent mark (hold music leftovers, transcoded
    /// audio).
    pub at_caller: Heard,
    // ---- agents --------------------------------------------------------------------------
    /// Successful REGISTERs (first ones and refreshes).
    pub registrations: u64,
    /// REGISTERs that ended in a final response other than 200/401, or no response.
    pub register_failures: u64,
    /// INVITEs the agents got (retransmissions not counted) and answered with 200.
    pub offers: u64,
    pub acks: u64,
    /// BYEs from the server (the caller hung up).
    pub byes: u64,
    pub cancels: u64,
    /// INVITEs for an agent id that is not ours (answered 404).
    pub unknown_requests: u64,
    /// BYEs for a call no longer up: retransmissions of a BYE we answered (our 200 was late
    /// or lost). Answered 200 again.
    pub late_byes: u64,
    /// Agent calls that ended (BYE) having received caller audio.
    pub agent_calls_ok: u64,
    /// Agent calls that ended without one packet of caller audio.
    pub agent_no_caller_audio: u64,
    /// Our 200 was never ACKed within 64·T1.
    pub agent_no_ack: u64,
    /// Agent calls ended by the end of the run (no BYE came).
    pub agent_calls_cut: u64,
    /// An INVITE for an agent that already had a call up.
    pub offers_to_busy_agent: u64,
    /// The caller audio the agents receive through the server.
    pub at_agent: Heard,
    /// RFC 4733 events relayed to the agent (the end of the caller's key into the queue).
    pub at_agent_events: u64,
    pub agent_tx: u64,
    pub agent_send_errors: u64,
    /// How long SIP messages waited on the agents' socket before an agent thread read them
    /// (kernel receive stamp → read), µs: the generator's own share of late answers.
    pub agent_sip_delay: Hist,
    /// An agent's 200 OK sent → the server's ACK read, µs (the server taking the answer).
    pub answer_to_ack: Hist,
}

impl BridgeStats {
    pub fn active(&self) -> bool {
        self.bridged
            + self.offers
            + self.registrations
            + self.register_failures
            + self.byes
            + self.agent_tx
            + self.at_caller.rx
            + self.at_agent.rx
            + self.agent_calls_cut
            > 0
    }

    pub fn merge(&mut self, o: &BridgeStats) {
        self.bridged += o.bridged;
        self.press_to_agent_audio.merge(&o.press_to_agent_audio);
        self.at_caller.merge(&o.at_caller);
        self.registrations += o.registrations;
        self.register_failures += o.register_failures;
        self.offers += o.offers;
        self.acks += o.acks;
        self.byes += o.byes;
        self.cancels += o.cancels;
        self.unknown_requests += o.unknown_requests;
        self.late_byes += o.late_byes;
        self.agent_calls_ok += o.agent_calls_ok;
        self.agent_no_caller_audio += o.agent_no_caller_audio;
        self.agent_no_ack += o.agent_no_ack;
        self.agent_calls_cut += o.agent_calls_cut;
        self.offers_to_busy_agent += o.offers_to_busy_agent;
        self.at_agent.merge(&o.at_agent);
        self.at_agent_events += o.at_agent_events;
        self.agent_tx += o.agent_tx;
        self.agent_send_errors += o.agent_send_errors;
        self.agent_sip_delay.merge(&o.agent_sip_delay);
        self.answer_to_ack.merge(&o.answer_to_ack);
    }

    /// Agent calls that failed.
    pub fn agent_failed(&self) -> u64 {
        self.agent_no_caller_audio + self.agent_no_ack
    }
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
    /// RTP datagrams our callers' sockets dropped (receive buffer full: our thread was late),
    /// by the kernel's count (SO_RXQ_OVFL). Part of the gaps, not the server's doing.
    pub rtp_dropped_here: u64,
    /// SIP datagrams our SIP sockets (callers' and agents') dropped, kernel's count.
    pub sip_dropped_here: u64,
    /// Answered calls that ended without one RTP packet from the server (whatever else
    /// happened to them).
    pub silent_calls: u64,
    /// 2xx answers to INVITEs of calls we had already given up on (no answer within 32 s):
    /// each was acknowledged and hung up at once, so the server does not keep the call.
    pub late_answers_ended: u64,
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
    pub not_bridged: u64,
    pub bridge: BridgeStats,
}

impl Stats {
    pub fn fail(&mut self, f: Failure) {
        match f {
            Failure::No200 => self.no_200 += 1,
            Failure::Non2xx(c) => *self.non_2xx.entry(c).or_default() += 1,
            Failure::NoRtp => self.no_rtp += 1,
            Failure::ByeUnanswered => self.bye_unanswered += 1,
            Failure::ServerBye => self.server_bye += 1,
            Failure::NotBridged => self.not_bridged += 1,
        }
    }

    pub fn failed(&self) -> u64 {
        self.no_200
            + self.non_2xx.values().sum::<u64>()
            + self.no_rtp
            + self.bye_unanswered
            + self.server_bye
            + self.not_bridged
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
        self.rtp_dropped_here += o.rtp_dropped_here;
        self.sip_dropped_here += o.sip_dropped_here;
        self.silent_calls += o.silent_calls;
        self.late_answers_ended += o.late_answers_ended;
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
        self.not_bridged += o.not_bridged;
        self.bridge.merge(&o.bridge);
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
    /// Datagrams dropped on the server's open UDP sockets for want of buffer room at the
    /// end of the step: (its SIP socket, all its open sockets), since they were opened.
    pub server_udp_drops: Option<(u64, u64)>,
    /// Agent calls up on average over the step (sampled every 50 ms), and at its end.
    pub avg_bridges: f64,
    pub bridges_at_end: u64,
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
        let b = &s.bridge;
        if b.active() {
            for (what, h) in [
                ("bridge pacing at the caller", &b.at_caller.pacing),
                ("bridge pacing at the agent", &b.at_agent.pacing),
            ] {
                let p = h.quantile(0.99);
                if p >= t.pacing_p99_us {
                    out.push(format!(
                        "{what} p99 {:.2} ms ≥ {:.2} ms",
                        ms(p),
                        ms(t.pacing_p99_us)
                    ));
                }
            }
            if b.agent_failed() > 0 {
                out.push(format!(
                    "{} agent calls failed (no caller audio {}, no ACK {})",
                    b.agent_failed(),
                    b.agent_no_caller_audio,
                    b.agent_no_ack
                ));
            }
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
                    "not_bridged": s.not_bridged,
                },
                "server_byes_answered": s.server_byes_seen,
                "answered_but_no_rtp_received": s.silent_calls,
                "live_at_end": self.live_at_end,
                "live_average": self.avg_live,
            },
            "setup": pct(&s.setup),
            "pacing_deviation": pct(&s.pacing),
            "rtp": {
                "received": s.rtp_rx,
                "bursts_under_5ms": s.bursts,
                "sequence_gaps": s.rtp_gaps,
                "dropped_by_our_sockets": s.rtp_dropped_here,
                "sip_dropped_by_our_sockets": s.sip_dropped_here,
                "late_answers_ended": s.late_answers_ended,
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
            "bridge": self.bridge_json(),
            "server": proc_json(&self.server),
            "server_cpu_percent_per_live_call": match &self.server {
                Some((a, b)) if self.avg_live >= 1.0 => json!(cpu_pct(a, b, self.seconds) / self.avg_live),
                _ => Value::Null,
            },
            "server_idle_rss_kib": self.server_idle_rss_kib,
            "server_udp_drops_since_open": self.server_udp_drops.map(|(sip, all)| json!({"sip_socket": sip, "all_open_sockets": all})),
            "server_rss_per_live_call_kib": self.rss_per_call_kib(),
            "generator": {
                "process": proc_json(&self.generator),
                "send_lag": pct(&s.send_lag),
                "stalls_over_20ms": s.stalls,
            },
            "machine": self.machine.map(|(a, b)| {
                let (busy, nice, softirq) = crate::procfs::machine_use(&a, &b);
                json!({"cpus": b.cpus, "busy_percent_of_one_core": busy, "niced_percent": nice, "softirq_percent": softirq, "udp_rcvbuf_errors_all_processes": b.udp_rcvbuf_errors.saturating_sub(a.udp_rcvbuf_errors)})
            }),
            "held": broken.is_empty(),
            "broken": broken,
        })
    }

    fn bridge_json(&self) -> Value {
        let b = &self.stats.bridge;
        json!({
            "bridged": b.bridged,
            "not_bridged": self.stats.not_bridged,
            "bridges_live_average": self.avg_bridges,
            "bridges_live_at_end": self.bridges_at_end,
            "press_to_agent_audio": pct(&b.press_to_agent_audio),
            "at_caller": {
                "pacing_deviation": pct(&b.at_caller.pacing),
                "received": b.at_caller.rx,
                "bursts_under_5ms": b.at_caller.bursts,
                "sequence_gaps": b.at_caller.gaps,
                "unmarked": b.at_caller.foreign,
                "dropped_by_our_socket": b.at_caller.dropped_here,
                "transit_from_agent": pct(&b.at_caller.transit),
                "relay_added_jitter": pct(&b.at_caller.jitter),
            },
            "at_agent": {
                "pacing_deviation": pct(&b.at_agent.pacing),
                "received": b.at_agent.rx,
                "bursts_under_5ms": b.at_agent.bursts,
                "sequence_gaps": b.at_agent.gaps,
                "unmarked": b.at_agent.foreign,
                "telephone_events": b.at_agent_events,
                "dropped_by_our_socket": b.at_agent.dropped_here,
                "transit_from_caller": pct(&b.at_agent.transit),
                "relay_added_jitter": pct(&b.at_agent.jitter),
            },
            "agents": {
                "registrations": b.registrations,
                "register_failures": b.register_failures,
                "offers_answered": b.offers,
                "acks": b.acks,
                "byes": b.byes,
                "cancels": b.cancels,
                "unknown_requests": b.unknown_requests,
                "bye_retransmissions": b.late_byes,
                "calls_ok": b.agent_calls_ok,
                "failed": b.agent_failed(),
                "failed_by_reason": {
                    "no_caller_audio": b.agent_no_caller_audio,
                    "no_ack": b.agent_no_ack,
                },
                "calls_cut_at_end": b.agent_calls_cut,
                "offers_to_busy_agent": b.offers_to_busy_agent,
                "rtp_sent": b.agent_tx,
                "send_errors": b.agent_send_errors,
                "sip_read_delay": pct(&b.agent_sip_delay),
                "answer_to_ack": pct(&b.answer_to_ack),
            },
        })
    }

    fn bridge_table(&self) -> String {
        let s = &self.stats;
        let b = &s.bridge;
        let mut o = String::new();
        o += &format!(
            "  bridge    bridged {}  not bridged {}  | live bridges avg {:.0}, at end {}\n",
            b.bridged, s.not_bridged, self.avg_bridges, self.bridges_at_end
        );
        o += &format!(
            "            key→agent audio   {}\n",
            pct_line(&b.press_to_agent_audio)
        );
        o += &format!(
            "  at caller pacing |Δt−20ms|  {}\n            relay |Δrx−Δtx|   {}\n            transit agent→caller {}\n            received {}  bursts(<5ms) {}  seq gaps {}  unmarked {}  dropped by our sockets {}\n",
            pct_line(&b.at_caller.pacing),
            pct_line(&b.at_caller.jitter),
            pct_line(&b.at_caller.transit),
            b.at_caller.rx,
            b.at_caller.bursts,
            b.at_caller.gaps,
            b.at_caller.foreign,
            b.at_caller.dropped_here
        );
        o += &format!(
            "  at agent  pacing |Δt−20ms|  {}\n            relay |Δrx−Δtx|   {}\n            transit caller→agent {}\n            received {}  bursts(<5ms) {}  seq gaps {}  unmarked {}  telephone-events {}  dropped by our sockets {}\n",
            pct_line(&b.at_agent.pacing),
            pct_line(&b.at_agent.jitter),
            pct_line(&b.at_agent.transit),
            b.at_agent.rx,
            b.at_agent.bursts,
            b.at_agent.gaps,
            b.at_agent.foreign,
            b.at_agent_events,
            b.at_agent.dropped_here
        );
        o += &format!(
            "  agents    SIP read delay    {}\n            200 OK→ACK        {}\n",
            pct_line(&b.agent_sip_delay),
            pct_line(&b.answer_to_ack)
        );
        o += &format!(
            "  agents    registrations {} (failures {})  offers answered {}  ACKs {}  BYEs {}  CANCELs {}  unknown requests {}  BYE retransmissions {}  | calls ok {}  failed {}: no caller audio {}, no ACK {}  | cut at end {}  offers to a busy agent {}  | sent {}  send errors {}\n",
            b.registrations,
            b.register_failures,
            b.offers,
            b.acks,
            b.byes,
            b.cancels,
            b.unknown_requests,
            b.late_byes,
            b.agent_calls_ok,
            b.agent_failed(),
            b.agent_no_caller_audio,
            b.agent_no_ack,
            b.agent_calls_cut,
            b.offers_to_busy_agent,
            b.agent_tx,
            b.agent_send_errors
        );
        o
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
            "  calls     placed {}  ok {}  failed {} ({:.3}%): no-200 {}, non-2xx {} [{}], no-RTP {}, BYE-unanswered {}, server-BYE-first {}, not-bridged {}  | live at end {}, server BYEs answered {}, answered but silent {}\n",
            s.placed, s.ok, s.failed(), frac, s.no_200, s.non_2xx.values().sum::<u64>(), codes.join(" "),
            s.no_rtp, s.bye_unanswered, s.server_bye, s.not_bridged, self.live_at_end, s.server_byes_seen, s.silent_calls
        );
        o += &format!("  setup     INVITE→200        {}\n", pct_line(&s.setup));
        o += &format!("  pacing    |Δt−20ms|         {}\n", pct_line(&s.pacing));
        o += &format!(
            "  rtp       received {}  bursts(<5ms) {}  seq gaps {} (dropped by our sockets {})  unstamped {}  | sent {}  send errors {}  | SIP dropped by our sockets {}  late answers ended {}\n",
            s.rtp_rx, s.bursts, s.rtp_gaps, s.rtp_dropped_here, s.unstamped, s.rtp_tx, s.send_errors, s.sip_dropped_here, s.late_answers_ended
        );
        o += &format!(
            "  digits    End→response      {}\n            press→response    {}\n            sent {}  answered before End {}  unanswered {}\n",
            pct_line(&s.end_to_response),
            pct_line(&s.press_to_response),
            s.digits_sent,
            s.answered_before_end,
            s.digits_unanswered
        );
        if s.bridge.active() {
            o += &self.bridge_table();
        }
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
        let drops = self
            .server_udp_drops
            .map(|(sip, all)| {
                format!("\n            UDP receive-buffer drops on its open sockets so far: SIP socket {sip}, all {all}")
            })
            .unwrap_or_default();
        o += &format!(
            "  server    {}{per_call}{cpu_per_call}{drops}\n",
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
                "  machine   {} CPUs busy {:.0}% of one core: niced processes (other sessions' builds) {:.0}%, softirq {:.0}%  | UDP receive-buffer drops (all processes) {}\n",
                b.cpus, busy, nice, softirq, b.udp_rcvbuf_errors.saturating_sub(a.udp_rcvbuf_errors)
            );
        }
        let broken = self.broken(t);
        if broken.is_empty() {
            o += "  targets   HELD (failed < 0.1%, pacing p99 < 2 ms (bridges: at both ends), setup p99 < 20 ms, digit p99 < 60 ms)\n";
        } else {
            o += &format!("  targets   BROKEN: {}\n", broken.join("; "));
        }
        o
    }
}
