//! Session timers (RFC 4028) on the calls we answer, sans-IO: what the INVITE asks for, what
//! our 2xx says, and when the UA core acts.
//!
//! Carriers' session border controllers commonly send `Session-Expires: 1800;refresher=uac`
//! with `Supported: timer`, and some `Require: timer`; we refused the latter with 420, so none
//! of their calls got through. A UAS that takes part:
//! - answers with `Session-Expires: <interval>;refresher=<who>` and, when the caller supports
//!   the extension, `Require: timer` (§9); the refresher is the one the INVITE named, else the
//!   caller when it supports timers, else us;
//! - refuses an interval under our `Min-SE` of 90 s (the RFC's floor) with 422 when the caller
//!   supports timers, and otherwise raises it to 90 s (§8.1 as corrected by erratum 1687);
//! - when the caller refreshes: treats every re-INVITE or UPDATE it answers 2xx as a refresh,
//!   and sends BYE if none comes, one third of the interval (at most 32 s) before it runs out
//!   (§10), so a trunk that lost the call does not hold a line and an operator forever;
//! - when we refresh: sends UPDATE (no body) at half the interval if the caller allows UPDATE,
//!   else a re-INVITE with the SDP we last sent, unchanged (§7.4); a 408 or 481 to it ends
//!   the call (§10).

use crate::sip::message::Request;
use std::time::Duration;

/// Our `Min-SE`: the smallest interval RFC 4028 allows.
pub(crate) const MIN_SE: u32 = 90;

/// The session timer agreed for a dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionTimer {
    /// Seconds.
    pub interval: u32,
    /// We send the refreshes (`refresher=uas`); else the caller does.
    pub we_refresh: bool,
    /// The caller supports the extension (`Supported` or `Require: timer`).
    pub peer_supports: bool,
    /// The caller allows UPDATE, so our refreshes can be UPDATEs without SDP.
    pub use_update: bool,
}

/// What an INVITE (or a refresh) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ask {
    /// No `Session-Expires`: no session timer.
    Nothing,
    /// An interval under [`MIN_SE`] from a caller that supports timers: answer 422.
    TooSmall,
    Timer(SessionTimer),
}

/// Whether `name` lists the option tag `tag` in `req`.
fn lists(req: &Request, name: &str, tag: &str) -> bool {
    req.headers_named(name)
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(tag))
}

/// Read the session timer `req` asks for.
pub fn ask(req: &Request) -> Ask {
    let Some(se) = req.header("Session-Expires") else {
        return Ask::Nothing;
    };
    let mut parts = se.split(';');
    let Some(interval) = parts.next().and_then(|d| d.trim().parse::<u32>().ok()) else {
        return Ask::Nothing; // unreadable: as if absent
    };
    let refresher = parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("refresher")
            .then(|| v.trim().to_ascii_lowercase())
    });
    let peer_supports = lists(req, "Supported", "timer") || lists(req, "Require", "timer");
    if interval < MIN_SE && peer_supports {
        return Ask::TooSmall;
    }
    let we_refresh = match refresher.as_deref() {
        Some("uas") => true,
        Some("uac") => false,
        _ => !peer_supports,
    };
    Ask::Timer(SessionTimer {
        interval: interval.max(MIN_SE),
        // A caller that does not support timers cannot be asked to refresh.
        we_refresh: we_refresh || !peer_supports,
        peer_supports,
        use_update: lists(req, "Allow", "UPDATE"),
    })
}

impl SessionTimer {
    /// Headers for our 2xx (to the INVITE and to each refresh).
    pub(crate) fn response_headers(&self) -> Vec<(String, String)> {
        let mut h = vec![(
            "Session-Expires".to_owned(),
            format!(
                "{};refresher={}",
                self.interval,
                if self.we_refresh { "uas" } else { "uac" }
            ),
        )];
        if self.peer_supports {
            h.push(("Require".to_owned(), "timer".to_owned()));
        }
        h
    }

    /// Headers for a refresh we send.
    pub(crate) fn refresh_headers(&self) -> Vec<(String, String)> {
        vec![
            (
                "Session-Expires".to_owned(),
                format!("{};refresher=uas", self.interval),
            ),
            ("Supported".to_owned(), "timer".to_owned()),
        ]
    }

    /// How long after a refresh (or the 2xx) the UA core acts: our next refresh at half the
    /// interval, or the BYE before the interval runs out with no refresh from the caller.
    pub(crate) fn next_action_after(&self) -> Duration {
        let interval = Duration::from_secs(u64::from(self.interval));
        if self.we_refresh {
            interval / 2
        } else {
            interval - (interval / 3).min(Duration::from_secs(32))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse_datagram, Message};

    fn invite(extra: &str) -> Request {
        let text = format!(
            "INVITE sip:311@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:311@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n\
{extra}Content-Length: 0\r\n\r\n"
        );
        match parse_datagram(text.as_bytes(), 65535).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => unreachable!(),
        }
    }

    #[test]
    fn what_carriers_send_and_what_we_answer() {
        // The usual SBC INVITE: it refreshes, every 1800 s, and may use UPDATE.
        let t = match ask(&invite(
            "Supported: timer, 100rel\r\nSession-Expires: 1800;refresher=uac\r\nMin-SE: 90\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n",
        )) {
            Ask::Timer(t) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            t,
            SessionTimer {
                interval: 1800,
                we_refresh: false,
                peer_supports: true,
                use_update: true
            }
        );
        assert_eq!(
            t.response_headers(),
            vec![
                ("Session-Expires".into(), "1800;refresher=uac".into()),
                ("Require".into(), "timer".into())
            ]
        );
        // BYE 32 s before the end if no refresh comes.
        assert_eq!(t.next_action_after(), Duration::from_secs(1768));
        // Compact form (`x`), no refresher named: the caller supports it, so it refreshes.
        let Ask::Timer(t) = ask(&invite("k: timer\r\nx: 600\r\n")) else {
            panic!()
        };
        assert!(!t.we_refresh && !t.use_update);
        assert_eq!(t.next_action_after(), Duration::from_secs(568));
        // refresher=uas: we refresh, at half the interval.
        let Ask::Timer(t) = ask(&invite(
            "Require: timer\r\nSession-Expires: 300;refresher=uas\r\n",
        )) else {
            panic!()
        };
        assert!(t.we_refresh);
        assert_eq!(t.next_action_after(), Duration::from_secs(150));
        assert_eq!(t.response_headers()[0].1, "300;refresher=uas");
    }

    #[test]
    fn too_small_unsupported_and_absent() {
        assert_eq!(
            ask(&invite("Supported: timer\r\nSession-Expires: 60\r\n")),
            Ask::TooSmall
        );
        // A proxy put it in for a caller without timers: raised to 90 s, and we refresh
        // (the caller cannot), with no Require: timer in our answer.
        let Ask::Timer(t) = ask(&invite("Session-Expires: 60\r\n")) else {
            panic!()
        };
        assert_eq!(
            (t.interval, t.we_refresh, t.peer_supports),
            (90, true, false)
        );
        assert_eq!(t.response_headers().len(), 1);
        assert_eq!(ask(&invite("Supported: timer\r\n")), Ask::Nothing);
        assert_eq!(ask(&invite("Session-Expires: soon\r\n")), Ask::Nothing);
    }
}
