//! What our G.711 frames carry for the bridge figures: the first 12 bytes of the payload of
//! every packet a bridged caller or an agent sends are a 4-byte origin mark and the
//! CLOCK_REALTIME ns at which it was sent (big-endian); the rest stays the tone. The server
//! passes audio through unchanged when both legs use the same law (the operator script makes
//! the caller offer PCMU first and the agents answer with the law offered first), so the
//! receiving end learns which side a packet came from and its relay transit time
//! (kernel receive stamp − send time; both ends run in this process, on one clock).
//!
//! A transcoded packet (the legs' laws differ) loses the mark: it is counted as foreign audio
//! and gives no transit time.

/// Sent by an agent (operator phone).
pub const FROM_AGENT: [u8; 4] = *b"\x7fAG\x7f";
/// Sent by a caller of a script that waits for an operator.
pub const FROM_CALLER: [u8; 4] = *b"\x7fCL\x7f";
/// Bytes the mark takes at the start of the payload.
pub const LEN: usize = 12;

/// Mark `frame` as sent by `origin` at `send_ns`.
pub fn stamp(frame: &mut [u8], origin: [u8; 4], send_ns: i64) {
    frame[..4].copy_from_slice(&origin);
    frame[4..LEN].copy_from_slice(&send_ns.to_be_bytes());
}

/// The payload of an RTP packet (after CSRCs and a header extension; padding left in), or
/// None if the packet is too short for what its header says.
pub fn rtp_payload(b: &[u8]) -> Option<&[u8]> {
    if b.len() < 12 {
        return None;
    }
    let cc = usize::from(b[0] & 0x0f);
    let mut start = 12 + 4 * cc;
    if b[0] & 0x10 != 0 {
        let ext = b.get(start + 2..start + 4)?;
        start += 4 + 4 * usize::from(u16::from_be_bytes([ext[0], ext[1]]));
    }
    b.get(start..)
}

/// The origin and send time of a marked payload.
pub fn read(payload: &[u8]) -> Option<([u8; 4], i64)> {
    let head = payload.get(..LEN)?;
    let origin: [u8; 4] = head[..4].try_into().ok()?;
    if origin != FROM_AGENT && origin != FROM_CALLER {
        return None;
    }
    let ns = i64::from_be_bytes(head[4..LEN].try_into().ok()?);
    Some((origin, ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_frame_reads_back_through_an_rtp_header() {
        let mut pkt = vec![0u8; 12 + 160];
        pkt[0] = 0x80;
        stamp(&mut pkt[12..], FROM_AGENT, 1_234_567_890_123);
        let p = rtp_payload(&pkt).unwrap();
        assert_eq!(p.len(), 160);
        assert_eq!(read(p), Some((FROM_AGENT, 1_234_567_890_123)));
        // One CSRC and a one-word extension move the payload.
        let mut pkt2 = vec![0x91u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        pkt2.extend_from_slice(&[0; 4]);
        pkt2.extend_from_slice(&[0xbe, 0xde, 0, 1, 1, 2, 3, 4]);
        let mut frame = [0xffu8; 160];
        stamp(&mut frame, FROM_CALLER, 7);
        pkt2.extend_from_slice(&frame);
        assert_eq!(read(rtp_payload(&pkt2).unwrap()), Some((FROM_CALLER, 7)));
        assert_eq!(read(&[0xff; 160]), None, "tone only: not ours");
        assert_eq!(rtp_payload(&[0x80; 8]), None);
    }
}
