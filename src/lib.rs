//! # ivr311
//!
//! An open telephony server for a city's 311 line: it answers SIP calls, plays prompts over
//! RTP, hears the caller's keys and (as the layers land) walks them through the city menu.
//!
//! # Layout
//!
//! One call flows top to bottom:
//!
//! | module | owns |
//! | --- | --- |
//! | [`sip::transport`] | UDP and TCP sockets, framing, parse-at-the-edge, stateless 400s |
//! | [`sip::message`] | the wire format (the only user of `rsip`), compact-form normalisation |
//! | [`sip::transaction`] | sans-IO RFC 3261 transactions and their timers |
//! | [`sip::dialog`] | dialog identifiers, route set, CSeq |
//! | [`sip::ua`] | the UA core task: transactions + dialogs, events to calls |
//! | [`media::sdp`] | SDP offer/answer (webrtc-rs `rtc-sdp`) |
//! | [`media::rtp`] | RTP packets (webrtc-rs `rtc-rtp`), symmetric-RTP latch |
//! | [`media::g711`], [`media::dtmf`] | G.711 µ/A-law, RFC 4733 events and the digit detector |
//! | [`media::prompt`] | WAV prompts, resampled and pre-encoded once, shared by all calls |
//! | [`media::session`] | one call's media, sans-IO: player, RTP stream, DTMF |
//! | [`call`] | accepting calls, the per-call task, the [`call::CallApp`] seam |
//! | [`api`] | HTTP (axum): `/health` |
//! | [`server`] | starting and stopping all of the above |
//! | [`config`] | flags, environment and the `--config` YAML |
//! | [`dispatch::tickets`] | the ticket store (SQLite, sqlx): 311 tickets, emergency-redirect audit |
//!
//! Dependency rule: `sip` and `media` never import `call`, `api` or `server`.

pub mod api;
pub mod call;
pub mod config;
pub mod dispatch;
pub mod media;
pub mod menu;
pub mod metrics;
pub mod server;
pub mod sip;
