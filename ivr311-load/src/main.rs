//! `ivr311-load`: a load generator for SIP IVRs that sends full media and measures on the
//! receiving side. See the README section "Load harness".
//!
//! It places calls over UDP SIP (`sip:311@target`), streams G.711 at 50 packets/s for the whole
//! call, presses RFC 4733 keys from a script, hangs up, and reports per step: failed calls by
//! reason, setup latency, the server's RTP pacing as received (kernel timestamps), digit to
//! response latency, and the server's CPU and memory from /proc.
//!
//! With `--agents N` it also plays the operators: N SIP phones (`load-0001`...) register with
//! the server and answer the calls its queue offers them; the `operator` script's callers walk
//! the menu to the queue, wait to be bridged, and talk both ways through the server, which is
//! measured at both ends (pacing, transit time, time to the operator).
//!
//! Layout: `cli` (the flags and the run: plan, threads, reports), `script` (what a caller does,
//! as data), `worker` (the per-thread call loop), `agents` (the operators' phones), `payload`
//! (send-time marks in the audio), `net` (recvmsg timestamps, epoll, timerfd), `hist` (fixed
//! histograms), `stats` (counts, targets, report), `procfs` (/proc readings), `spawn`
//! (`--spawn-server`).
//!
//! Linux only (epoll, timerfd, `SO_TIMESTAMPNS`, /proc): elsewhere the binary builds and says so,
//! so the workspace builds on any Unix.
//!
//! What it uses of the server's crate, all protocol types a phone would need (the server's
//! internals stay its own):
//! - `ivr311::sip::message::{parse_datagram, uri_user, Message, Method, Request, Response,
//!   ResponseBuilder}`: parsing what the server sends, answering its requests;
//! - `ivr311::media::g711::Codec`, `ivr311::media::rtp::RtpStream`,
//!   `ivr311::media::dtmf::{digit_to_event, TelephoneEvent}`: the audio and the keys;
//! - `ivr311::media::sdp::parse` (its `addr`, `codecs`, `telephone_event`): the server's SDP;
//! - `ivr311::menu::schema::{parse, MenuFile, Action, TicketSteps}`: the menu file, to find the
//!   keys to a ticket or a queue.

#[cfg(target_os = "linux")]
mod agents;
#[cfg(target_os = "linux")]
mod cli;
#[cfg(target_os = "linux")]
mod hist;
#[cfg(target_os = "linux")]
mod net;
#[cfg(target_os = "linux")]
mod payload;
#[cfg(target_os = "linux")]
mod procfs;
#[cfg(target_os = "linux")]
mod script;
#[cfg(target_os = "linux")]
mod spawn;
#[cfg(target_os = "linux")]
mod stats;
#[cfg(target_os = "linux")]
mod worker;

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("ivr311-load needs Linux (epoll, timerfd, SO_TIMESTAMPNS, /proc)");
    std::process::ExitCode::FAILURE
}
