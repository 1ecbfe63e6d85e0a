//! RTP parsing, RFC 4733 telephone-events, the DTMF detector and SIP INFO DTMF bodies.
#![no_main]

use ivr311::media::dtmf::{dtmf_info_digit, DtmfDetector, TelephoneEvent};
use ivr311::media::rtp;
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = rtp::parse(data) {
        let _ = TelephoneEvent::parse(packet.payload);
    }
    let _ = TelephoneEvent::parse(data);

    // Packets for the detector: 8-byte chunks of [timestamp u32 BE][payload 4 bytes]; the
    // first byte of each payload's duration also advances a synthetic clock (0..=255 ms).
    let mut detector = DtmfDetector::new();
    let mut now = Instant::now();
    for chunk in data.chunks(8) {
        if chunk.len() < 4 {
            break;
        }
        let ts = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let payload = &chunk[4..];
        let step = payload.get(2).copied().unwrap_or(20);
        now += Duration::from_millis(u64::from(step) * 4);
        match detector.on_packet(now, ts, payload) {
            Ok(Some(d)) => assert!("0123456789*#ABCD".contains(d), "bad digit {d:?}"),
            Ok(None) => {}
            Err(_) => assert!(payload.len() < 4),
        }
    }

    for ct in ["application/dtmf-relay", "application/dtmf"] {
        if let Some(d) = dtmf_info_digit(ct, data) {
            assert!("0123456789*#ABCD".contains(d), "bad digit {d:?}");
        }
    }
});
