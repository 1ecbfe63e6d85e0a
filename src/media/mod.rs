//! Media: SDP offer/answer, RTP, G.711, RFC 4733 DTMF, prompts, and the per-call media session.
//!
//! Ground floor: no SIP, no sockets (the call task owns the RTP socket), no menus.

pub mod bridge;
pub mod dtmf;
pub mod g711;
pub mod prompt;
pub mod record;
pub mod rtp;
pub mod sdp;
pub mod session;
