//! # ivr311
//!
//! An open telephony server for a city's 311 line: it answers SIP calls, plays prompts over
//! RTP, hears the caller's keys, walks them through the city menu, files tickets, sends anyone
//! in danger to 911, and queues callers for operators.
//!
//! # Layout
//!
//! One call flows top to bottom:
//!
//! | module | owns |
//! | --- | --- |
//! | [`sip::transport`] | UDP and TCP sockets, SIP over WebSocket frames, framing, parse-at-the-edge, stateless 400s |
//! | [`sip::message`] | the wire format (the only user of `rsip`), compact-form normalisation |
//! | [`sip::transaction`] | sans-IO RFC 3261 transactions and their timers |
//! | [`sip::dialog`] | dialog identifiers, route set, CSeq |
//! | [`sip::ua`] | the UA core: sans-IO by role (acceptor, initiator, session timers, agents' REGISTER, our trunk registration) behind one tokio task; events to calls |
//! | [`sip::registrar`] | agents' REGISTER with digest authentication |
//! | [`sip::trunk`] | our registration with a SIP trunk, sans-IO, and the `trunks:` section |
//! | [`sip::resolve`] | host names in the URIs we send to (hickory-resolver), RFC 3263 order and failover |
//! | [`sip::guard`] | trunk allow-lists, per-source rate limits, scanner User-Agents |
//! | [`media::sdp`] | SDP offer/answer (webrtc-rs `rtc-sdp`) |
//! | [`media::rtp`] | RTP packets (webrtc-rs `rtc-rtp`), symmetric-RTP latch |
//! | [`media::g711`], [`media::dtmf`] | G.711 µ/A-law, RFC 4733 events and the digit detector |
//! | [`media::prompt`] | WAV prompts, resampled and pre-encoded once, shared by all calls |
//! | [`media::session`] | one call's media, sans-IO: player, RTP stream, DTMF |
//! | [`media::clock`] | the media clock: threads that pace every call's RTP on a 20 ms grid |
//! | [`media::ports`] | the RTP port pool (plain sockets, not registered with the reactor) |
//! | [`media::speech`] | the seam for speaking text (announcements): a `Speech` trait, `NoSpeech` without synthesis |
//! | [`media::bridge`], [`media::record`] | relaying RTP between legs; recording callers (hound) |
//! | [`media::mix`] | mixing a monitored bridge's three parties (listen, whisper, barge), sans-IO |
//! | [`media::tts`] | speech of dynamic text (status notes, dates): espeak-ng loaded at run time, on one thread, resampled to 8 kHz, cached |
//! | [`media::webrtc`] | a browser leg, sans-IO: ICE-lite, DTLS-SRTP and SRTP (webrtc-rs `rtc-dtls`, `rtc-srtp`, `rtc-stun`), driven by the media clock |
//! | [`menu::schema`], [`menu::validate`] | the menu YAML admins edit, and `ivr311 check` |
//! | [`menu::engine`] | the sans-IO menu walk: keys, timeouts, prompts in; actions out |
//! | [`menu::say`] | numbers as prompts per language ("twelve", "doce"), identifiers digit by digit |
//! | [`menu::bulletin`] | emergency announcements as the engine sees them: when each is heard, its temporary main-menu keys |
//! | [`menu::schedule`] | opening hours: `schedules:` compiled in the city's time zone, and the wall clock calls read them by |
//! | [`dispatch::tickets`] | the ticket store (sqlx, SQLite) and the 911 audit table |
//! | [`dispatch::outbox`] | the durable outbox (what the CRM and webhooks are owed), written in each change's transaction |
//! | [`forward`] | delivering the outbox: the city's Open311 CRM (`forward:`) and signed webhooks (`webhooks:`), retries, the CRM's status polled back |
//! | [`dispatch::announcements`] | emergency announcements: validated, stored, audio decoded or spoken once, reloaded for calls |
//! | [`dispatch::emergency`] | 911 redirect policy (refer → bridge → announce); `call` carries it out |
//! | [`dispatch::numbers`] | which numbers call-backs may dial (E.164, NANP, dial-plan patterns) |
//! | [`dispatch::queue`] | operator queues, sans-IO, with a small tokio driver |
//! | [`call`] | accepting calls; each call a sans-IO core (menu, queue, operator leg, the 911 redirect) driven by a thin task; call-backs |
//! | [`call::lines`] | several lines on one server: the dialled number (P-Called-Party-ID, Diversion, Request-URI, To) chooses the menu |
//! | [`api`] | HTTP (axum on hyper, with timeouts and a connection cap): `/health`, `/health/ready`, Open311 GeoReport v2, admin API, `/metrics`, SIP over WebSocket (`/sip`), the embedded JsSIP, the operator console (`/console`), the supervisor's wallboard (`/supervisor`, `api::supervisor`) |
//! | [`history`] | call history that lasts (calls, operators' states, queue events), written off the call's path; the reports' formulas |
//! | [`privacy`] | retention of callers' data (`retention:`, a daily audited pass) and residents' export and erasure requests |
//! | [`heartbeat`] | when a loop (media clock thread, SIP UA) last turned, for readiness |
//! | [`metrics`] | counters for `/metrics` |
//! | [`server`] | starting and stopping all of the above |
//! | [`config`] | flags, environment and the `--config` YAML: aggregates the sections the modules own |
//! | [`logging`] | what log lines may show of callers (`log:`, numbers redacted) |
//! | [`sockopt`] | QoS marking (`qos:`, DSCP) and the integer socket options std does not expose |
//!
//! Dependency rule: `sip`, `media` and `menu` never import `call`, `dispatch`, `api`,
//! `server` or `config` (each owns its settings types; `config` aggregates them);
//! `menu::engine` imports neither `sip` nor `media`; `dispatch` never touches sockets or SIP
//! (calls act for it through channels); call-backs (`call::callback`) never reach into a live
//! call.
//!
//! Users outside this crate: `main.rs`, the tests, and the load generator (`ivr311-load/`, a
//! member of the workspace), which uses only the protocol types a phone needs:
//! [`sip::message`] (`parse_datagram`, `uri_user`, `Message`, `Method`, `Request`, `Response`,
//! `ResponseBuilder`), [`media::g711::Codec`], [`media::rtp::RtpStream`],
//! [`media::dtmf`] (`digit_to_event`, `TelephoneEvent`), [`media::sdp::parse`], and
//! [`menu::schema`] (`parse`, `MenuFile`, `Action`, `TicketSteps`) to find a menu's keys.
//!
//! Platforms: Linux, and other Unix-like systems without what is Linux-only, each behind
//! `cfg(target_os = "linux")`: elsewhere the media clock receives one datagram and sends one
//! packet a system call (no `recvmmsg`, epoll or io_uring), never asks for real-time priority,
//! and SIP host names are looked up by A/AAAA only (no SRV).

// The crate's documentation is for the people who work on it, built with its private items
// (`cargo doc --document-private-items`, as `.ci/run` checks it): the map above and the module
// docs link to crate-private modules and items on purpose.
#![allow(rustdoc::private_intra_doc_links)]

#[cfg(not(unix))]
compile_error!(
    "ivr311 runs on Linux and other Unix-like systems: it sets socket options (DSCP, buffer sizes) \
     on file descriptors and handles SIGTERM/SIGHUP"
);

pub(crate) mod api;
pub mod call;

pub mod config;
pub mod dispatch;
pub mod forward;
pub mod heartbeat;
pub(crate) mod history;
pub mod logging;
pub mod media;
pub mod menu;
pub mod metrics;
pub mod privacy;
pub mod server;
pub mod sip;
pub mod sockopt;
