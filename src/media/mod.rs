//! Media: SDP offer/answer, RTP, G.711, RFC 4733 DTMF, prompts, the per-call media session, and
//! browser legs (ICE-lite, DTLS-SRTP: [`webrtc`]), and speech of dynamic text ([`tts`], espeak-ng).
//!
//! Ground floor: no SIP, no menus. The cores (session, DTMF, G.711, RTP, SDP, bridge relay)
//! touch no sockets and read no clock; two drivers do: [`ports`] binds each call's RTP port and
//! [`clock`] paces every call's RTP on shared 20 ms threads.

pub mod bridge;
pub(crate) mod call_record;
pub mod clock;
pub mod dtmf;
pub mod g711;
pub mod inband;
pub mod mix;
pub mod ports;
pub mod prompt;
pub(crate) mod record;
pub mod rtp;
pub mod sdp;
pub mod session;
pub mod speech;
pub mod tts;
pub mod webrtc;
