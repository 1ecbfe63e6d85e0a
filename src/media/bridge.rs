//! Relaying RTP between two legs (a caller and the 911 trunk or an operator), sans-IO.
//!
//! Each leg negotiated its own codec and payload types. A packet from one leg is rewritten in
//! place for the other: audio is transcoded PCMU⇄PCMA when the laws differ, the payload type
//! is renumbered, and RFC 4733 events pass through at the other leg's telephone-event type
//! (dropped if that leg has none). Anything else (other payload types, garbage) is dropped. No
//! allocation per packet.
//!
//! Each direction then goes through a [`Restamp`]: the far phone sees one stream under one
//! SSRC whose sequence numbers and timestamps run on, even when the talker's side switches
//! streams (a gateway moving from its DTMF generator to its audio source, a re-INVITE to
//! another media server). Passing the talker's numbering through unchanged, as the first
//! version did, made baresip 1.0 drop every packet after such a switch as "late" when the new
//! stream's sequence numbers looked older, so the operator heard nothing.

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

/// One direction of a bridge, as the receiving phone sees it: our SSRC, and sequence numbers
/// and timestamps that continue across a change of the sending stream.
#[derive(Debug, Clone)]
pub(crate) struct Restamp {
    ssrc: u32,
    /// The sending stream we are following, and the offsets that map it onto ours.
    source: Option<u32>,
    seq_delta: u16,
    ts_delta: u32,
    /// The newest sequence number and timestamp we sent.
    last_seq: u16,
    last_ts: u32,
    /// Something was sent: a new sending stream continues from `last_seq`.
    sent: bool,
}

impl Restamp {
    pub(crate) fn new(ssrc: u32) -> Self {
        Restamp {
            ssrc,
            source: None,
            seq_delta: 0,
            ts_delta: 0,
            last_seq: 0,
            last_ts: 0,
            sent: false,
        }
    }

    /// After a gap (a new bridge on the same leg): the next packet continues one after the
    /// last one sent, even from the same sending stream, so the receiver sees no jump in
    /// sequence numbers however long the gap was (SRTP's rollover count is guessed from them:
    /// a jump of half their range would lose every packet after it).
    pub fn resume(&mut self) {
        self.source = None;
    }

    /// Rewrite the header of a packet [`relay`] forwarded (`buf` starts with a parsed RTP
    /// header). A new sending stream continues one packet after the last one sent, and its
    /// first audio packet carries the marker (a new talk spurt, so the phone resyncs).
    pub(crate) fn apply(&mut self, buf: &mut [u8], event: bool) {
        if buf.len() < rtp::HEADER_LEN {
            return;
        }
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        let ts = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let first = !self.sent;
        if self.source != Some(ssrc) {
            let (next_seq, next_ts) = if first {
                (seq, ts)
            } else {
                (
                    self.last_seq.wrapping_add(1),
                    self.last_ts.wrapping_add(FRAME_SAMPLES),
                )
            };
            self.seq_delta = next_seq.wrapping_sub(seq);
            self.ts_delta = next_ts.wrapping_sub(ts);
            self.source = Some(ssrc);
            if !event {
                buf[1] |= 0x80;
            }
        }
        let out_seq = seq.wrapping_add(self.seq_delta);
        let out_ts = ts.wrapping_add(self.ts_delta);
        buf[2..4].copy_from_slice(&out_seq.to_be_bytes());
        buf[4..8].copy_from_slice(&out_ts.to_be_bytes());
        buf[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        // Only newer packets move the mark (a reordered old one must not pull it back).
        if first || (1..0x8000).contains(&out_seq.wrapping_sub(self.last_seq)) {
            self.last_seq = out_seq;
            self.last_ts = out_ts;
        }
        self.sent = true;
    }
}

/// Samples in a 20 ms G.711 packet: the timestamp step assumed across a stream switch.
const FRAME_SAMPLES: u32 = 160;

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

    fn header(buf: &[u8]) -> (bool, u16, u32, u32) {
        let p = rtp::parse(buf).unwrap();
        (p.marker, p.sequence, p.timestamp, p.ssrc)
    }

    #[test]
    fn after_a_gap_the_same_stream_continues_ours_without_a_jump() {
        let mut r = Restamp::new(77);
        let mut buf = [0u8; 200];
        let mut a = RtpStream::with_origin(1, 1000, 50_000);
        for _ in 0..2 {
            let n = a.write(0, &[0xff; 160], 160, &mut buf);
            r.apply(&mut buf[..n], false);
        }
        assert_eq!(header(&buf[..60]).1, 1001);
        // The stream went on for a minute (a hold) with nothing relayed.
        for _ in 0..3000 {
            a.write(0, &[0xff; 160], 160, &mut buf);
        }
        r.resume();
        let n = a.write(0, &[0xff; 160], 160, &mut buf);
        r.apply(&mut buf[..n], false);
        assert_eq!(header(&buf[..n]), (true, 1002, 50_320, 77));
        let n = a.write(0, &[0xff; 160], 160, &mut buf);
        r.apply(&mut buf[..n], false);
        assert_eq!(header(&buf[..n]), (false, 1003, 50_480, 77));
    }

    #[test]
    fn a_switch_of_the_sending_stream_continues_ours() {
        let mut r = Restamp::new(77);
        let mut buf = [0u8; 200];
        // The first stream keeps its numbering, under our SSRC.
        let mut a = RtpStream::with_origin(1, 1000, 50_000);
        for _ in 0..3 {
            let n = a.write(0, &[0xff; 160], 160, &mut buf);
            r.apply(&mut buf[..n], false);
        }
        let n = a.write(0, &[0xff; 160], 160, &mut buf);
        r.apply(&mut buf[..n], false);
        assert_eq!(header(&buf[..n]), (false, 1003, 50_480, 77));
        // A new stream whose numbers look older (SIPp switching pcaps): it runs on from ours.
        let mut b = RtpStream::with_origin(2, 10, 160);
        let n = b.write(0, &[0xff; 160], 160, &mut buf);
        r.apply(&mut buf[..n], false);
        assert_eq!(header(&buf[..n]), (true, 1004, 50_640, 77));
        let n = b.write(0, &[0xff; 160], 160, &mut buf);
        r.apply(&mut buf[..n], false);
        assert_eq!(header(&buf[..n]), (false, 1005, 50_800, 77));
    }

    #[test]
    fn a_late_packet_keeps_its_place_and_does_not_pull_the_mark_back() {
        let mut r = Restamp::new(9);
        let mut buf = [0u8; 200];
        let mut s = RtpStream::with_origin(3, 65_534, 0);
        let mut packets = Vec::new();
        for _ in 0..4 {
            let n = s.write(0, &[0xff; 160], 160, &mut buf);
            packets.push(buf[..n].to_vec());
        }
        // Delivered 0, 2, 1 (late), 3 across the sequence wrap.
        for i in [0, 2, 1, 3] {
            let mut p = packets[i].clone();
            r.apply(&mut p, false);
            assert_eq!(header(&p).1, 65_534u16.wrapping_add(i as u16));
        }
        // Then a new stream continues after the newest (3 → 65_537 = 1), not the late one.
        let mut t = RtpStream::with_origin(4, 500, 0);
        let n = t.write(0, &[0xff; 160], 160, &mut buf);
        r.apply(&mut buf[..n], false);
        assert_eq!(header(&buf[..n]).1, 2);
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
