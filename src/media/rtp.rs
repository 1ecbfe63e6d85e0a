//! RTP packets (RFC 3550): our outgoing stream's sequence/timestamp/SSRC bookkeeping, parsing of
//! incoming packets through webrtc-rs's sans-IO `rtc-rtp`, and symmetric-RTP latching.
//!
//! No sockets and no clock here. Writing goes into a caller-provided buffer so the send path
//! allocates nothing per packet. Our own packets only ever carry the 12-byte fixed header (no
//! CSRCs, no extension, no padding), which [`RtpStream::write_at`] writes directly: building
//! and dropping an `rtc-rtp` `Header` for each one was more than half the cost of a call's
//! 20 ms send tick (BENCHMARKS.md). A test checks the bytes against `rtc-rtp`'s own.

use rtc_rtp::header::Header;
use rtc_shared::marshal::{MarshalSize, Unmarshal};
use std::net::{IpAddr, SocketAddr};

/// RTP fixed header length without CSRCs or extensions.
pub const HEADER_LEN: usize = 12;

/// Why an incoming datagram is not usable RTP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    #[error("not RTP: {0}")]
    Malformed(String),
    #[error("RTP version {0} is not 2")]
    Version(u8),
    /// RTCP sent to the RTP port (rtcp-mux); ignored, not an error for the call.
    #[error("RTCP packet type {0}")]
    Rtcp(u8),
}

/// A parsed incoming packet borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming<'a> {
    pub payload_type: u8,
    pub(crate) marker: bool,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub payload: &'a [u8],
}

/// Parse one datagram as RTP.
pub fn parse(buf: &[u8]) -> Result<Incoming<'_>, RtpError> {
    if buf.len() < HEADER_LEN {
        return Err(RtpError::Malformed(format!("{} bytes", buf.len())));
    }
    let version = buf[0] >> 6;
    if version != 2 {
        return Err(RtpError::Version(version));
    }
    // RFC 5761: RTCP packet types 200..=204 (as the second byte) when muxed.
    if (200..=204).contains(&buf[1]) {
        return Err(RtpError::Rtcp(buf[1]));
    }
    let mut reader = buf;
    let header = Header::unmarshal(&mut reader).map_err(|e| RtpError::Malformed(e.to_string()))?;
    let start = header.marshal_size();
    let mut end = buf.len();
    if header.padding {
        let pad = buf[end - 1] as usize;
        if pad == 0 || start + pad > end {
            return Err(RtpError::Malformed("bad padding".into()));
        }
        end -= pad;
    }
    if start > end {
        return Err(RtpError::Malformed("header longer than packet".into()));
    }
    Ok(Incoming {
        payload_type: header.payload_type,
        marker: header.marker,
        sequence: header.sequence_number,
        timestamp: header.timestamp,
        ssrc: header.ssrc,
        payload: &buf[start..end],
    })
}

/// Our outgoing RTP stream: one SSRC, a running sequence number and timestamp.
#[derive(Debug, Clone)]
pub struct RtpStream {
    ssrc: u32,
    sequence: u16,
    timestamp: u32,
    marker_next: bool,
}

impl RtpStream {
    /// A stream with random SSRC, sequence and timestamp origins (RFC 3550 §5.1).
    pub fn new() -> Self {
        Self::with_origin(rand::random(), rand::random(), rand::random())
    }

    pub fn with_origin(ssrc: u32, sequence: u16, timestamp: u32) -> Self {
        RtpStream {
            ssrc,
            sequence,
            timestamp,
            marker_next: true,
        }
    }

    pub fn timestamp(&self) -> u32 {
        self.timestamp
    }

    /// The next packet starts a talk spurt (RFC 3551 §4.1: marker bit).
    pub(crate) fn start_talkspurt(&mut self) {
        self.marker_next = true;
    }

    /// Let `samples` of time pass without sending (after a stall): the receiver sees a gap in
    /// timestamps, not a burst of late packets.
    pub fn skip(&mut self, samples: u32) {
        self.timestamp = self.timestamp.wrapping_add(samples);
        self.marker_next = true;
    }

    /// Write one packet carrying `payload` (covering `samples` of time) into `out`; returns its
    /// length. `out` must hold `HEADER_LEN + payload.len()` bytes.
    pub fn write(
        &mut self,
        payload_type: u8,
        payload: &[u8],
        samples: u32,
        out: &mut [u8],
    ) -> usize {
        let n = self.write_at(payload_type, self.timestamp, self.marker_next, payload, out);
        self.marker_next = false;
        self.timestamp = self.timestamp.wrapping_add(samples);
        n
    }

    /// Write a packet with an explicit timestamp and marker (RFC 4733 events keep the event's
    /// start timestamp across packets). Advances only the sequence number.
    pub fn write_at(
        &mut self,
        payload_type: u8,
        timestamp: u32,
        marker: bool,
        payload: &[u8],
        out: &mut [u8],
    ) -> usize {
        let len = HEADER_LEN + payload.len();
        let out = &mut out[..len];
        // V=2, P=0, X=0, CC=0 | M, PT | sequence | timestamp | SSRC (RFC 3550 §5.1).
        out[0] = 0x80;
        out[1] = (u8::from(marker) << 7) | (payload_type & 0x7f);
        out[2..4].copy_from_slice(&self.sequence.to_be_bytes());
        out[4..8].copy_from_slice(&timestamp.to_be_bytes());
        out[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        out[HEADER_LEN..].copy_from_slice(payload);
        self.sequence = self.sequence.wrapping_add(1);
        len
    }
}

impl Default for RtpStream {
    fn default() -> Self {
        Self::new()
    }
}

/// Symmetric RTP (RFC 4961 style, "comedia"): send to where the caller's media comes from.
///
/// We start with the address from the SDP and latch once to the source of the first valid RTP
/// packet, which is the right address behind NAT. After latching, packets from other addresses
/// are dropped (and counted), so a third party cannot hijack the stream.
///
/// When a re-INVITE (or the answer in its ACK) moves the media, we send to the new address and
/// latch again, but not to the source we were latched to before: packets still in flight from
/// it (a phone's last few before the transfer or move) arrive after the new SDP, and latching
/// to them sent our audio back to where the media had just left (seen in a test: one packet
/// reached the new address, then none). They are still taken in (a relay that keeps its
/// source across a re-INVITE is heard), only not latched to.
///
/// A packet from the address the SDP names always takes the latch, even from another source.
/// Without that, whatever reached our port first kept it: a stream still aimed at a port we
/// had just been given (its previous call ended without the far end stopping; seen in CI as
/// two tests' audio crossed) took the caller's audio away for the whole call, and the caller's
/// own packets were dropped as foreign. The SDP's address is what signalling vouches for, so
/// it cannot be a worse choice than the first stranger; behind NAT it never sends, and the
/// first-packet rule still finds the phone.
///
/// Only sources the signalling vouches for may send at all ([`LatchScope`]): a packet whose IP
/// is neither the SDP's address nor the IP the call's signalling came from (or went to) is
/// foreign from the start, so a third party that learns or guesses a call's port can neither
/// take the caller's audio nor press keys in their call. The port stays free to vary: NAT
/// gives the phone's media a port of its own on the same public address as its signalling.
#[derive(Debug, Clone)]
pub(crate) struct Latch {
    signalled: SocketAddr,
    scope: LatchScope,
    latched: Option<SocketAddr>,
    /// Where we were latched before the last move, until the new source latches.
    previous: Option<SocketAddr>,
}

/// Which sources may send to a port and take its latch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LatchScope {
    /// Only the IP address the SDP names.
    Sdp,
    /// The IP the SDP names, or this one: where the far end's signalling came from (a caller,
    /// an operator's registration) or went to (a trunk we called). A phone behind NAT sends
    /// its media from the public address its SIP comes from; a carrier's media gateway is the
    /// address its SDP names.
    SdpOr(IpAddr),
    /// Any source (the 911 leg: a PSAP's media is never refused for where it comes from).
    Anywhere,
}

impl LatchScope {
    /// Whether a packet from `ip` may be taken, with `sdp` the SDP's address.
    fn admits(self, ip: IpAddr, sdp: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match self {
            LatchScope::Sdp => ip == sdp.to_canonical(),
            LatchScope::SdpOr(other) => ip == sdp.to_canonical() || ip == other.to_canonical(),
            LatchScope::Anywhere => true,
        }
    }
}

/// What to do with a packet from a given source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LatchDecision {
    /// First packet: we now send to this address.
    Latched,
    Accept,
    /// From somewhere else after latching, or from a source outside the latch's
    /// [`LatchScope`] at any time: drop it.
    Foreign,
}

impl Latch {
    /// A latch for media the SDP says comes from `signalled`, taking packets from the sources
    /// `scope` admits.
    pub(crate) fn new(signalled: SocketAddr, scope: LatchScope) -> Self {
        Latch {
            signalled,
            scope,
            latched: None,
            previous: None,
        }
    }

    /// Where our packets go now.
    pub(crate) fn remote(&self) -> SocketAddr {
        self.latched.unwrap_or(self.signalled)
    }

    /// Take packets from the sources `scope` admits from now on.
    pub(crate) fn set_scope(&mut self, scope: LatchScope) {
        self.scope = scope;
    }

    pub(crate) fn is_latched(&self) -> bool {
        self.latched.is_some()
    }

    /// Latched to the address the SDP names: no later packet can move the latch, so packets
    /// from anywhere else may as well be dropped by the kernel.
    pub(crate) fn is_settled(&self) -> bool {
        self.latched == Some(self.signalled)
    }

    /// A new SDP (re-INVITE) names a new address: follow it and latch again.
    pub(crate) fn resignal(&mut self, addr: SocketAddr) {
        if addr != self.signalled {
            self.signalled = addr;
            self.previous = self.latched.take().or(self.previous);
        }
    }

    pub(crate) fn on_packet(&mut self, from: SocketAddr) -> LatchDecision {
        if !self.scope.admits(from.ip(), self.signalled.ip()) {
            return LatchDecision::Foreign;
        }
        if from == self.signalled && self.latched != Some(from) {
            self.latched = Some(from);
            self.previous = None;
            return LatchDecision::Latched;
        }
        match self.latched {
            None if self.previous == Some(from) && from != self.signalled => LatchDecision::Accept,
            None => {
                self.latched = Some(from);
                self.previous = None;
                LatchDecision::Latched
            }
            Some(a) if a == from => LatchDecision::Accept,
            Some(_) => LatchDecision::Foreign,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_stream_does_not_latch_back_to_its_old_source() {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let mut l = Latch::new(addr(4000), LatchScope::Sdp);
        assert_eq!(l.on_packet(addr(5000)), LatchDecision::Latched);
        assert_eq!(l.remote(), addr(5000));
        // A re-INVITE moves the media to 6000; a late packet from the old source is heard but
        // does not take our audio back there.
        l.resignal(addr(6000));
        assert_eq!(l.remote(), addr(6000));
        assert_eq!(l.on_packet(addr(5000)), LatchDecision::Accept);
        assert_eq!(l.remote(), addr(6000));
        // The new endpoint's first packet (from behind NAT: another address) latches.
        assert_eq!(l.on_packet(addr(7000)), LatchDecision::Latched);
        assert_eq!(l.remote(), addr(7000));
        assert_eq!(l.on_packet(addr(5000)), LatchDecision::Foreign);
        // Moved back to the first address later: its source may latch again.
        l.resignal(addr(5000));
        assert_eq!(l.on_packet(addr(5000)), LatchDecision::Latched);
    }

    #[test]
    fn write_then_parse_round_trip_with_marker_on_first_packet() {
        let mut s = RtpStream::with_origin(0xdead_beef, 65535, 1000);
        let mut buf = [0u8; 200];
        let n = s.write(0, &[0xff; 160], 160, &mut buf);
        assert_eq!(n, 172);
        let p = parse(&buf[..n]).unwrap();
        assert_eq!(
            (
                p.payload_type,
                p.marker,
                p.sequence,
                p.timestamp,
                p.ssrc,
                p.payload.len()
            ),
            (0, true, 65535, 1000, 0xdead_beef, 160)
        );
        let n = s.write(0, &[0xff; 160], 160, &mut buf);
        let p = parse(&buf[..n]).unwrap();
        assert_eq!((p.marker, p.sequence, p.timestamp), (false, 0, 1160));
        s.skip(320);
        let n = s.write(8, &[0xd5; 160], 160, &mut buf);
        let p = parse(&buf[..n]).unwrap();
        assert_eq!(
            (p.marker, p.sequence, p.timestamp, p.payload_type),
            (true, 1, 1640, 8)
        );
    }

    #[test]
    fn written_header_is_what_rtc_rtp_writes() {
        use rtc_shared::marshal::Marshal;
        for (pt, marker, seq, ts, ssrc) in [
            (0u8, true, 65535u16, 1000u32, 0xdead_beefu32),
            (8, false, 0, u32::MAX, 1),
            (101, true, 4660, 0x1234_5678, 0x8765_4321),
            (127, false, 1, 0, u32::MAX),
        ] {
            let mut s = RtpStream::with_origin(ssrc, seq, 0);
            let mut ours = [0u8; 64];
            let n = s.write_at(pt, ts, marker, &[1, 2, 3], &mut ours);
            let header = Header {
                version: 2,
                marker,
                payload_type: pt,
                sequence_number: seq,
                timestamp: ts,
                ssrc,
                ..Default::default()
            };
            let mut theirs = [0u8; 64];
            let m = header.marshal_to(&mut theirs).unwrap();
            assert_eq!((n, &ours[..m]), (m + 3, &theirs[..m]));
            assert_eq!(&ours[m..n], &[1, 2, 3]);
        }
    }

    #[test]
    fn garbage_is_rejected_without_panic() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[0x80; 5]).is_err());
        assert_eq!(parse(&[0x40; 20]), Err(RtpError::Version(1)));
        // RTCP receiver report muxed onto the RTP port
        let rr = [0x81, 201, 0, 1, 0, 0, 0, 1];
        assert!(parse(&rr).is_err());
        // padding longer than the packet
        let mut p = [0u8; 14];
        p[0] = 0xA0;
        p[13] = 200;
        assert!(parse(&p).is_err());
        // CSRC count promising more than present
        let mut p = [0u8; 12];
        p[0] = 0x8F;
        assert!(parse(&p).is_err());
    }

    #[test]
    fn latch_once_then_drop_foreign_sources() {
        let sdp: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let real: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        let mut l = Latch::new(sdp, LatchScope::SdpOr(real.ip()));
        assert_eq!(l.remote(), sdp);
        assert_eq!(l.on_packet(real), LatchDecision::Latched);
        assert_eq!(l.remote(), real);
        assert_eq!(l.on_packet(real), LatchDecision::Accept);
        assert_eq!(l.on_packet(other), LatchDecision::Foreign);
        assert_eq!(l.remote(), real);
        l.resignal(other);
        assert_eq!(l.on_packet(other), LatchDecision::Latched);
    }

    #[test]
    fn the_sdp_address_takes_the_latch_back_from_a_stray_stream() {
        let sdp: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let stray: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut l = Latch::new(sdp, LatchScope::Sdp);
        // Someone else's stream reached the port first.
        assert_eq!(l.on_packet(stray), LatchDecision::Latched);
        assert_eq!(l.on_packet(sdp), LatchDecision::Latched);
        assert_eq!(l.remote(), sdp);
        assert_eq!(l.on_packet(stray), LatchDecision::Foreign);
        assert_eq!(l.on_packet(sdp), LatchDecision::Accept);
    }

    /// Behind NAT the phone's SDP names a private address and its media comes from the NAT's
    /// public address, the one its SIP came from: that latches. A third party elsewhere is
    /// never heard and never takes the stream, before or after the phone's first packet.
    #[test]
    fn only_the_sdp_address_or_the_signalling_source_may_latch() {
        let sdp: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let nat: SocketAddr = "198.51.100.7:31000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.66:4000".parse().unwrap();
        let mut l = Latch::new(sdp, LatchScope::SdpOr(nat.ip()));
        assert_eq!(l.on_packet(stranger), LatchDecision::Foreign);
        assert_eq!(l.remote(), sdp, "a stranger first does not take our audio");
        assert_eq!(l.on_packet(nat), LatchDecision::Latched);
        assert_eq!(l.remote(), nat);
        assert_eq!(l.on_packet(stranger), LatchDecision::Foreign);
        // A carrier: signalling from its proxy, media from the gateway its SDP names (at a
        // port of its choosing); an IPv4 source seen on a dual-stack socket counts as itself.
        let gateway: SocketAddr = "192.0.2.20:20000".parse().unwrap();
        let mut l = Latch::new(gateway, LatchScope::SdpOr("192.0.2.10".parse().unwrap()));
        let mapped: SocketAddr = "[::ffff:192.0.2.20]:20002".parse().unwrap();
        assert_eq!(l.on_packet(mapped), LatchDecision::Latched);
        // Only the SDP's address.
        let mut l = Latch::new(sdp, LatchScope::Sdp);
        assert_eq!(l.on_packet(nat), LatchDecision::Foreign);
        assert_eq!(
            l.on_packet("10.0.0.5:4002".parse().unwrap()),
            LatchDecision::Latched
        );
        // Anywhere: the first source latches, as for the 911 leg.
        let mut l = Latch::new(sdp, LatchScope::Anywhere);
        assert_eq!(l.on_packet(stranger), LatchDecision::Latched);
    }
}
