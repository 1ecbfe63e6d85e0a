//! Relaying RTP between two legs (a caller and the 911 trunk or an operator), sans-IO.
//!
//! Each leg negotiated its own codec and payload types. A packet from one leg is rewritten in
//! place for the other: audio is transcoded PCMU⇄PCMA when the laws differ, the payload type
//! is renumbered, and RFC 4733 events pass through at the other leg's telephone-event type
//! (dropped if that leg has none). Sequence numbers, timestamps and SSRC pass through
//! unchanged: we relay the talker's stream, we do not re-originate it. Anything else (other
//! payload types, garbage) is dropped. No allocation per packet.

use crate::media::g711::Codec;
use crate::media::rtp;
use crate::media::sdp::Negotiated;

/// What happened to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// Forward `buf[..len]` to the other leg.
    Forward { len: usize, event: bool },
    /// Not forwarded (not audio or events of the negotiated types, or not RTP).
    Drop,
}

/// Rewrite a packet received on a leg that negotiated `from` for a leg that negotiated `to`.
pub fn relay(buf: &mut [u8], len: usize, from: &Negotiated, to: &Negotiated) -> Relay {
    let (pt, start, end) = match rtp::parse(&buf[..len]) {
        Ok(p) => {
            let start = len - p.payload.len() - padding(&buf[..len]);
            (p.payload_type, start, start + p.payload.len())
        }
        Err(_) => return Relay::Drop,
    };
    let marker = buf[1] & 0x80;
    if pt == from.payload_type {
        if from.codec != to.codec {
            Codec::transcode_in_place(from.codec, to.codec, &mut buf[start..end]);
        }
        buf[1] = marker | (to.payload_type & 0x7f);
        return Relay::Forward { len, event: false };
    }
    if Some(pt) == from.telephone_event {
        return match to.telephone_event {
            Some(te) => {
                buf[1] = marker | (te & 0x7f);
                Relay::Forward { len, event: true }
            }
            None => Relay::Drop,
        };
    }
    Relay::Drop
}

fn padding(buf: &[u8]) -> usize {
    if buf.first().is_some_and(|b| b & 0x20 != 0) {
        buf.last().map_or(0, |p| *p as usize)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::dtmf::TelephoneEvent;
    use crate::media::rtp::RtpStream;
    use crate::media::sdp::Direction;

    fn neg(codec: Codec, pt: u8, te: Option<u8>) -> Negotiated {
        Negotiated {
            codec,
            payload_type: pt,
            telephone_event: te,
            direction: Direction::SendRecv,
        }
    }

    #[test]
    fn audio_is_transcoded_and_renumbered() {
        let caller = neg(Codec::Pcmu, 0, Some(101));
        let trunk = neg(Codec::Pcma, 8, Some(96));
        let mut s = RtpStream::with_origin(5, 10, 1000);
        let pcm: Vec<i16> = (0..160).map(|i| (i * 100) as i16).collect();
        let mut ulaw = [0u8; 160];
        Codec::Pcmu.encode(&pcm, &mut ulaw);
        let mut buf = [0u8; 200];
        let n = s.write(0, &ulaw, 160, &mut buf);
        assert_eq!(
            relay(&mut buf, n, &caller, &trunk),
            Relay::Forward {
                len: n,
                event: false
            }
        );
        let p = rtp::parse(&buf[..n]).unwrap();
        assert_eq!(
            (p.payload_type, p.marker, p.sequence, p.timestamp, p.ssrc),
            (8, true, 10, 1000, 5)
        );
        let mut expect = [0u8; 160];
        Codec::transcode(Codec::Pcmu, Codec::Pcma, &ulaw, &mut expect);
        assert_eq!(p.payload, &expect[..]);
    }

    #[test]
    fn events_pass_through_at_the_other_legs_type() {
        let caller = neg(Codec::Pcmu, 0, Some(101));
        let agent = neg(Codec::Pcmu, 0, Some(96));
        let mut s = RtpStream::with_origin(5, 10, 1000);
        let ev = TelephoneEvent {
            event: 5,
            end: false,
            volume: 10,
            duration: 160,
        };
        let mut buf = [0u8; 64];
        let n = s.write_at(101, 1000, true, &ev.write(), &mut buf);
        assert_eq!(
            relay(&mut buf, n, &caller, &agent),
            Relay::Forward {
                len: n,
                event: true
            }
        );
        let p = rtp::parse(&buf[..n]).unwrap();
        assert_eq!(p.payload_type, 96);
        assert_eq!(TelephoneEvent::parse(p.payload).unwrap(), ev);
        // A leg without telephone-event does not get events.
        let n = s.write_at(101, 1000, true, &ev.write(), &mut buf);
        assert_eq!(
            relay(&mut buf, n, &caller, &neg(Codec::Pcmu, 0, None)),
            Relay::Drop
        );
    }

    #[test]
    fn other_payloads_and_garbage_are_dropped() {
        let a = neg(Codec::Pcmu, 0, Some(101));
        let mut s = RtpStream::with_origin(5, 10, 1000);
        let mut buf = [0u8; 64];
        let n = s.write(18, &[1, 2, 3], 80, &mut buf);
        assert_eq!(relay(&mut buf, n, &a, &a), Relay::Drop);
        let mut junk = *b"not rtp at all";
        assert_eq!(relay(&mut junk, 14, &a, &a), Relay::Drop);
    }
}
