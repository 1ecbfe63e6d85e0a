//! DTMF key presses from RFC 4733 telephone-events (and SIP INFO bodies).
//!
//! Owns: parsing and writing the 4-byte RFC 4733 event payload, the mapping
//! between event codes and keypad characters, the sans-IO [`DtmfDetector`]
//! that turns the telephone-event packets of one RTP stream into key presses
//! reported exactly once, and parsing of SIP INFO DTMF bodies
//! ([`dtmf_info_digit`]).
//!
//! Must not touch: sockets, RTP header parsing, payload-type negotiation,
//! clocks or timers. The caller strips the RTP header, checks the payload
//! type against the negotiated `telephone-event` one, and passes the current
//! time in; nothing here reads the clock or does I/O, so every behaviour is
//! reproducible in unit tests.

use std::time::{Duration, Instant};

/// One RFC 4733 §2.3 telephone-event payload.
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |     event     |E|R| volume    |          duration             |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// Event code: 0–9, 10 `*`, 11 `#`, 12–15 `A`–`D`; higher codes are not DTMF keys.
    pub event: u8,
    /// The E bit: this packet marks the end of the event.
    pub end: bool,
    /// Power level in -dBm0 (0..=63; only the low 6 bits are written).
    pub volume: u8,
    /// Duration so far, in RTP timestamp units.
    pub duration: u16,
}

/// Errors from parsing telephone-event payloads.
#[derive(Debug, thiserror::Error)]
pub enum DtmfError {
    /// The payload is shorter than the 4 bytes of an RFC 4733 event.
    #[error("telephone-event payload too short: {len} bytes, need 4")]
    Truncated {
        /// Length of the payload received.
        len: usize,
    },
}

impl TelephoneEvent {
    /// Parses a 4-byte RFC 4733 payload. Longer payloads are accepted and only
    /// the first 4 bytes read (RFC 4733 allows several events per packet in
    /// redundancy schemes; the first is the current one). Shorter ones are
    /// [`DtmfError::Truncated`].
    pub fn parse(payload: &[u8]) -> Result<Self, DtmfError> {
        match payload {
            [event, flags, d0, d1, ..] => Ok(TelephoneEvent {
                event: *event,
                end: flags & 0x80 != 0,
                volume: flags & 0x3F,
                duration: u16::from_be_bytes([*d0, *d1]),
            }),
            _ => Err(DtmfError::Truncated { len: payload.len() }),
        }
    }

    /// Serialises to the 4-byte payload (R bit zero, volume masked to 6 bits).
    pub fn write(&self) -> [u8; 4] {
        let flags = if self.end { 0x80 } else { 0 } | (self.volume & 0x3F);
        let [d0, d1] = self.duration.to_be_bytes();
        [self.event, flags, d0, d1]
    }
}

/// Maps an RFC 4733 event code to its keypad character:
/// 0–9 → `'0'`–`'9'`, 10 → `'*'`, 11 → `'#'`, 12–15 → `'A'`–`'D'`, others → `None`.
pub(crate) fn event_to_digit(event: u8) -> Option<char> {
    match event {
        0..=9 => Some(char::from(b'0' + event)),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + (event - 12))),
        _ => None,
    }
}

/// Inverse of [`event_to_digit`]; `'a'`–`'d'` are accepted as `'A'`–`'D'`.
pub fn digit_to_event(digit: char) -> Option<u8> {
    match digit {
        '0'..='9' => Some(digit as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        'A'..='D' => Some(digit as u8 - b'A' + 12),
        'a'..='d' => Some(digit as u8 - b'a' + 12),
        _ => None,
    }
}

/// An event with the same RTP timestamp and code as an event that has ended is
/// a *new* press only if that event's last packet arrived more than this long
/// ago. See [`DtmfDetector`] for why.
pub(crate) const SAME_TIMESTAMP_REPRESS_GAP: Duration = Duration::from_millis(250);

/// An event whose End packets were all lost is considered over once no packet
/// of it has arrived for this long (continuation packets normally come every
/// 50 ms). This lets a SIPp-style replay of the same event be seen as a new
/// press even when the first replay's End packets never arrived.
pub(crate) const UNENDED_EVENT_TIMEOUT: Duration = Duration::from_secs(1);

/// How many recent events are remembered, so that a late (reordered)
/// retransmission of an earlier event is not mistaken for a new press.
const HISTORY: usize = 4;

/// One key press being tracked.
#[derive(Debug, Clone, Copy)]
struct Press {
    rtp_timestamp: u32,
    event: u8,
    /// An End packet was seen (or a later event started, which implies it).
    ended: bool,
    /// Arrival time of the last packet of this event.
    last_packet_at: Instant,
}

impl Press {
    /// Whether a packet with the same timestamp and code arriving at `now`
    /// still belongs to this press.
    fn owns(&self, now: Instant) -> bool {
        let gap = now.saturating_duration_since(self.last_packet_at);
        if self.ended {
            gap <= SAME_TIMESTAMP_REPRESS_GAP
        } else {
            gap <= UNENDED_EVENT_TIMEOUT
        }
    }
}

/// Turns RFC 4733 packets of one RTP stream into key presses, each reported exactly once.
///
/// Rules:
/// * A digit is reported on the **first** packet of a new event, so barge-in
///   is immediate, even if that first packet is already an End packet (the
///   start packets may have been lost).
/// * Packets with the same RTP timestamp and the same event code as a
///   remembered event are the same press (RFC 4733 §2.5.1: the timestamp is
///   the event's start and stays the same in every packet of it):
///   continuations, and the End packet that senders transmit three times.
/// * A different timestamp, or a different event code, is a new press; it
///   also implies the previous event is over.
///
/// **Decision on same timestamp + same code after an End.** SIPp's DTMF
/// pcaps (`/usr/share/sip-tester/dtmf_2833_*.pcap`) all carry the same SSRC,
/// sequence numbers and RTP timestamp, so replaying the same pcap twice for
/// a repeated digit ("press 1 twice") is byte-for-byte identical to a
/// retransmission. We therefore also use arrival time: such a packet is a
/// *new* press when the earlier event has already ended (End seen) **and**
/// the last packet of that earlier event arrived more than
/// [`SAME_TIMESTAMP_REPRESS_GAP`] (250 ms) before `now`. End
/// retransmissions arrive within about 40 ms of each other (sent 20 ms
/// apart, plus jitter), and a human cannot release a key and press it again
/// within 250 ms, so neither real case is misread. Each late retransmission
/// that does arrive refreshes the event's last-packet time, so a tail of
/// retransmissions spaced under 250 ms apart never turns into a new press.
///
/// If every End packet of an event is lost, the event is treated as ended
/// once no packet of it has arrived for [`UNENDED_EVENT_TIMEOUT`] (1 s); a
/// same-timestamp, same-code packet after that is a new press too.
///
/// The detector remembers the last few events, not just the current one, so
/// an End retransmission of digit 5 that is reordered behind the first
/// packet of the next digit 6 is still recognised as part of the 5.
#[derive(Debug, Clone, Default)]
pub struct DtmfDetector {
    recent: [Option<Press>; HISTORY],
    /// Slot of `recent` holding the newest press.
    newest: usize,
}

impl DtmfDetector {
    /// A detector that has seen no event yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `now` is passed in (never read the clock inside). `rtp_timestamp` is the RTP header timestamp
    /// (which, per RFC 4733, is the event's start and is the same in every packet of one event).
    /// Returns Some(digit) the first time a new key press is seen, None for continuation/end/retransmitted packets.
    ///
    /// A new event whose code is not a DTMF key (16 and up: flash, tones...)
    /// is tracked like any other event but returns `None`. A payload shorter
    /// than 4 bytes is an error and leaves the detector unchanged.
    pub fn on_packet(
        &mut self,
        now: Instant,
        rtp_timestamp: u32,
        payload: &[u8],
    ) -> Result<Option<char>, DtmfError> {
        let ev = TelephoneEvent::parse(payload)?;

        for press in self.recent.iter_mut().flatten() {
            if press.rtp_timestamp == rtp_timestamp && press.event == ev.event && press.owns(now) {
                press.last_packet_at = now;
                press.ended |= ev.end;
                tracing::trace!(
                    event = ev.event,
                    rtp_timestamp,
                    end = ev.end,
                    "telephone-event continuation"
                );
                return Ok(None);
            }
        }

        // A new press. Any earlier event is over now, even if its End was lost.
        for press in self.recent.iter_mut().flatten() {
            press.ended = true;
        }
        self.newest = (self.newest + 1) % HISTORY;
        self.recent[self.newest] = Some(Press {
            rtp_timestamp,
            event: ev.event,
            ended: ev.end,
            last_packet_at: now,
        });
        let digit = event_to_digit(ev.event);
        match digit {
            Some(d) => tracing::debug!(digit = %d, rtp_timestamp, "DTMF key press"),
            None => tracing::debug!(
                event = ev.event,
                rtp_timestamp,
                "telephone-event that is not a DTMF key"
            ),
        }
        Ok(digit)
    }
}

/// Extracts the key from a SIP INFO DTMF body.
///
/// * `application/dtmf-relay`: lines of `key=value`, e.g.
///   `Signal=5\r\nDuration=160\r\n`; keys are case-insensitive, spaces around
///   `=` are ignored, and the signal may be a character (`5`, `*`, `#`, `A`)
///   or an event number (`10` = `*`, `11` = `#`, `12`–`15` = `A`–`D`).
/// * `application/dtmf`: the body is just the key character or event number.
///
/// Media-type parameters (`; charset=...`) and case are ignored. Returns
/// `None` for any other content type, a non-UTF-8 body, or no valid key.
pub fn dtmf_info_digit(content_type: &str, body: &[u8]) -> Option<char> {
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    let body = std::str::from_utf8(body).ok()?;
    if media_type.eq_ignore_ascii_case("application/dtmf-relay") {
        body.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            if key.trim().eq_ignore_ascii_case("signal") {
                parse_signal(value)
            } else {
                None
            }
        })
    } else if media_type.eq_ignore_ascii_case("application/dtmf") {
        parse_signal(body)
    } else {
        None
    }
}

/// A key given as its character or as its RFC 4733 event number.
fn parse_signal(value: &str) -> Option<char> {
    let value = value.trim();
    let mut chars = value.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        return digit_to_event(c).and_then(event_to_digit);
    }
    value.parse::<u8>().ok().and_then(event_to_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `(ms since t0, rtp timestamp, payload)` packets and collects digits.
    fn run(det: &mut DtmfDetector, t0: Instant, packets: &[(u64, u32, [u8; 4])]) -> String {
        let mut digits = String::new();
        for (ms, ts, payload) in packets {
            let now = t0 + MS * u32::try_from(*ms).unwrap_or(u32::MAX);
            if let Some(d) = det.on_packet(now, *ts, payload).expect("valid payload") {
                digits.push(d);
            }
        }
        digits
    }

    /// A complete press of event `ev` starting at `start_ms` with timestamp
    /// `ts`: 3 progress packets, then the End packet sent three times.
    fn press(ev: u8, start_ms: u64, ts: u32) -> Vec<(u64, u32, [u8; 4])> {
        vec![
            (start_ms, ts, [ev, 0x0A, 0x00, 0xA0]),
            (start_ms + 20, ts, [ev, 0x0A, 0x01, 0x40]),
            (start_ms + 40, ts, [ev, 0x0A, 0x01, 0xE0]),
            (start_ms + 60, ts, [ev, 0x8A, 0x03, 0x20]),
            (start_ms + 80, ts, [ev, 0x8A, 0x03, 0x20]),
            (start_ms + 100, ts, [ev, 0x8A, 0x03, 0x20]),
        ]
    }

    #[test]
    fn parse_and_write() {
        let ev = TelephoneEvent::parse(&[0x05, 0x8A, 0x03, 0x20]).expect("4 bytes");
        assert_eq!(
            ev,
            TelephoneEvent {
                event: 5,
                end: true,
                volume: 10,
                duration: 800
            }
        );
        assert_eq!(ev.write(), [0x05, 0x8A, 0x03, 0x20]);
        // R bit ignored on parse, extra bytes ignored.
        let ev = TelephoneEvent::parse(&[0x0B, 0x7F, 0x00, 0xA0, 0xFF, 0xFF]).expect("6 bytes");
        assert_eq!(ev.event, 11);
        assert!(!ev.end);
        assert_eq!(ev.volume, 63);
        assert_eq!(ev.duration, 160);
        assert_eq!(ev.write(), [0x0B, 0x3F, 0x00, 0xA0]);
        // Volume beyond 6 bits is masked, not allowed to set E/R.
        let ev = TelephoneEvent {
            event: 1,
            end: false,
            volume: 0xFF,
            duration: 0,
        };
        assert_eq!(ev.write(), [0x01, 0x3F, 0, 0]);
    }

    #[test]
    fn truncated_payload_is_error() {
        for len in 0..4 {
            let bytes = [0x05u8; 3];
            let err = TelephoneEvent::parse(&bytes[..len]).expect_err("too short");
            assert!(matches!(err, DtmfError::Truncated { len: l } if l == len));
            assert!(err.to_string().contains("too short"));
        }
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        assert!(det.on_packet(t0, 1, &[0x05, 0x8A]).is_err());
        // The error left no state behind: the next valid packet is a press.
        assert_eq!(
            det.on_packet(t0, 1, &[0x05, 0x8A, 0, 0]).expect("valid"),
            Some('5')
        );
    }

    #[test]
    fn digit_mapping() {
        let expected = "0123456789*#ABCD";
        for (ev, c) in expected.chars().enumerate() {
            let ev = u8::try_from(ev).expect("small");
            assert_eq!(event_to_digit(ev), Some(c));
            assert_eq!(digit_to_event(c), Some(ev));
        }
        assert_eq!(digit_to_event('b'), Some(13));
        for ev in 16..=255u8 {
            assert_eq!(event_to_digit(ev), None);
        }
        assert_eq!(digit_to_event('E'), None);
        assert_eq!(digit_to_event(' '), None);
        assert_eq!(digit_to_event('٣'), None);
    }

    #[test]
    fn one_press_one_digit() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        assert_eq!(run(&mut det, t0, &press(5, 0, 1000)), "5");
    }

    #[test]
    fn digit_reported_on_first_packet() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let r = det
            .on_packet(t0, 1000, &[0x09, 0x0A, 0x00, 0xA0])
            .expect("valid");
        assert_eq!(r, Some('9'));
    }

    #[test]
    fn two_different_digits() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts = press(1, 0, 1000);
        pkts.extend(press(2, 300, 3400));
        assert_eq!(run(&mut det, t0, &pkts), "12");
    }

    #[test]
    fn different_code_same_timestamp_is_new_press() {
        // SIPp: dtmf_2833_1.pcap then dtmf_2833_2.pcap share the timestamp.
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts = press(1, 0, 1000);
        pkts.extend(press(2, 150, 1000));
        assert_eq!(run(&mut det, t0, &pkts), "12");
    }

    #[test]
    fn same_digit_twice_different_timestamps() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts = press(7, 0, 1000);
        pkts.extend(press(7, 300, 3400));
        assert_eq!(run(&mut det, t0, &pkts), "77");
    }

    #[test]
    fn sipp_replay_same_timestamp_two_seconds_apart() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts = press(1, 0, 0x1234_5678);
        pkts.extend(press(1, 2000, 0x1234_5678));
        assert_eq!(run(&mut det, t0, &pkts), "11");
    }

    /// The packets of SIPp's `dtmf_2833_1.pcap`, as captured: RTP timestamp
    /// 13280 in all of them, and the three End packets sent at the same instant.
    fn sipp_dtmf_1(start_ms: u64) -> Vec<(u64, u32, [u8; 4])> {
        let payloads: [[u8; 4]; 10] = [
            [0x01, 0x0a, 0x00, 0x00],
            [0x01, 0x0a, 0x01, 0x40],
            [0x01, 0x0a, 0x02, 0x80],
            [0x01, 0x0a, 0x03, 0xc0],
            [0x01, 0x0a, 0x05, 0x00],
            [0x01, 0x0a, 0x06, 0x40],
            [0x01, 0x0a, 0x07, 0x80],
            [0x01, 0x8a, 0x08, 0xc0],
            [0x01, 0x8a, 0x08, 0xc0],
            [0x01, 0x8a, 0x08, 0xc0],
        ];
        let at = [0, 20, 40, 60, 80, 100, 120, 140, 140, 140];
        at.iter()
            .zip(payloads)
            .map(|(ms, p)| (start_ms + ms, 13280, p))
            .collect()
    }

    #[test]
    fn sipp_pcap_bytes_replayed() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        assert_eq!(run(&mut det, t0, &sipp_dtmf_1(0)), "1");
        // Replayed 500 ms after the first one started (360 ms after its End).
        assert_eq!(run(&mut det, t0, &sipp_dtmf_1(500)), "1");
        // And once more, 2 s later.
        assert_eq!(run(&mut det, t0, &sipp_dtmf_1(2500)), "1");
    }

    #[test]
    fn late_end_retransmission_is_ignored() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts = press(4, 0, 1000);
        // Last End at 100 ms; a late copy 100 ms later, then another 200 ms
        // after that (each within 250 ms of the previous packet).
        pkts.push((200, 1000, [0x04, 0x8A, 0x03, 0x20]));
        pkts.push((400, 1000, [0x04, 0x8A, 0x03, 0x20]));
        assert_eq!(run(&mut det, t0, &pkts), "4");
    }

    #[test]
    fn reordered_end_of_previous_digit_is_ignored() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts = press(5, 0, 1000);
        pkts.push((150, 2600, [0x06, 0x0A, 0x00, 0xA0]));
        // End retransmission of the 5 delayed behind the 6's first packet.
        pkts.push((160, 1000, [0x05, 0x8A, 0x03, 0x20]));
        pkts.push((170, 2600, [0x06, 0x8A, 0x01, 0x40]));
        assert_eq!(run(&mut det, t0, &pkts), "56");
    }

    #[test]
    fn lost_start_packets_only_end() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let pkts = [
            (0, 500, [0x0B, 0x8A, 0x03, 0x20]),
            (20, 500, [0x0B, 0x8A, 0x03, 0x20]),
            (40, 500, [0x0B, 0x8A, 0x03, 0x20]),
        ];
        assert_eq!(run(&mut det, t0, &pkts), "#");
    }

    #[test]
    fn lost_end_packets_then_replay() {
        // First press loses all its End packets; the replay 2 s later with
        // the same timestamp is still a new press.
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts: Vec<_> = press(3, 0, 1000).into_iter().take(3).collect();
        pkts.extend(press(3, 2000, 1000));
        assert_eq!(run(&mut det, t0, &pkts), "33");
    }

    #[test]
    fn long_hold_is_one_press() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts = Vec::new();
        for i in 0..100u16 {
            let d = (i + 1) * 400;
            let [d0, d1] = d.to_be_bytes();
            pkts.push((u64::from(i) * 50, 1000, [0x00, 0x0A, d0, d1]));
        }
        pkts.push((5000, 1000, [0x00, 0x8A, 0xFF, 0xFF]));
        assert_eq!(run(&mut det, t0, &pkts), "0");
    }

    #[test]
    fn timestamp_wraparound() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts = press(8, 0, u32::MAX - 10);
        pkts.extend(press(9, 300, 5));
        assert_eq!(run(&mut det, t0, &pkts), "89");
    }

    #[test]
    fn events_12_to_16_and_beyond() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now();
        let mut pkts = Vec::new();
        for (i, ev) in (12u8..=15).enumerate() {
            let i = u32::try_from(i).expect("small");
            pkts.extend(press(ev, u64::from(i) * 300, 1000 + i * 2400));
        }
        assert_eq!(run(&mut det, t0, &pkts), "ABCD");
        // 16 (flash) and 255: tracked, never a digit, never a panic.
        let mut pkts = press(16, 2000, 50_000);
        pkts.extend(press(255, 2300, 60_000));
        assert_eq!(run(&mut det, t0, &pkts), "");
        // A real digit afterwards still works.
        assert_eq!(run(&mut det, t0, &press(1, 2600, 70_000)), "1");
    }

    #[test]
    fn clock_going_backwards_does_not_panic() {
        let mut det = DtmfDetector::new();
        let t0 = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            det.on_packet(t0, 1, &[1, 0x80, 0, 0]).ok().flatten(),
            Some('1')
        );
        let earlier = t0 - Duration::from_secs(5);
        assert_eq!(
            det.on_packet(earlier, 1, &[1, 0x80, 0, 0]).ok().flatten(),
            None
        );
    }

    #[test]
    fn info_dtmf_relay() {
        let ct = "application/dtmf-relay";
        assert_eq!(
            dtmf_info_digit(ct, b"Signal=5\r\nDuration=160\r\n"),
            Some('5')
        );
        assert_eq!(dtmf_info_digit(ct, b"Signal= *\r\nDuration=160"), Some('*'));
        assert_eq!(dtmf_info_digit(ct, b"signal=#\nduration=100\n"), Some('#'));
        assert_eq!(dtmf_info_digit(ct, b"SIGNAL = 10\r\n"), Some('*'));
        assert_eq!(dtmf_info_digit(ct, b"Signal=11"), Some('#'));
        assert_eq!(
            dtmf_info_digit(ct, b"Duration=160\r\nSignal=a\r\n"),
            Some('A')
        );
        assert_eq!(dtmf_info_digit(ct, b"Signal=15"), Some('D'));
        assert_eq!(
            dtmf_info_digit("Application/DTMF-Relay; charset=utf-8", b"Signal=0"),
            Some('0')
        );
        assert_eq!(dtmf_info_digit(ct, b"Signal=16"), None);
        assert_eq!(dtmf_info_digit(ct, b"Signal="), None);
        assert_eq!(dtmf_info_digit(ct, b"Signal=55"), None);
        assert_eq!(dtmf_info_digit(ct, b"Duration=160"), None);
        assert_eq!(dtmf_info_digit(ct, b""), None);
        assert_eq!(dtmf_info_digit(ct, b"Signal=\xFF"), None);
    }

    #[test]
    fn info_dtmf() {
        let ct = "application/dtmf";
        assert_eq!(dtmf_info_digit(ct, b"5"), Some('5'));
        assert_eq!(dtmf_info_digit(ct, b"5\r\n"), Some('5'));
        assert_eq!(dtmf_info_digit(ct, b"#"), Some('#'));
        assert_eq!(dtmf_info_digit(ct, b"10"), Some('*'));
        assert_eq!(dtmf_info_digit(ct, b"11"), Some('#'));
        assert_eq!(dtmf_info_digit(ct, b"x"), None);
        assert_eq!(dtmf_info_digit(ct, b""), None);
        assert_eq!(dtmf_info_digit("text/plain", b"5"), None);
        assert_eq!(dtmf_info_digit("application/sdp", b"Signal=5"), None);
    }
}
