//! Regression tests for the fuzz targets in `fuzz/` (see `fuzz/README.md`).
//!
//! Each test feeds inputs through the same public API and checks the same invariants as the
//! matching fuzz target. No crash has been found yet, so for now these replay the committed
//! seed corpora (`fuzz/seeds/<target>/`); crashing inputs found later go here as
//! their own tests.

use ivr311::media::dtmf::{dtmf_info_digit, DtmfDetector, TelephoneEvent};
use ivr311::media::g711::Codec;
use ivr311::media::{rtp, sdp};
use ivr311::menu::{schema, validate};
use ivr311::sip::message::{frame_stream, parse_datagram, Frame, Message, ResponseBuilder};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn sip_message_seeds() {
    for (path, data) in seeds("sip_message") {
        if let Ok(Frame::Complete(n) | Frame::KeepAlive(n)) = frame_stream(&data, 65536) {
            assert!(n > 0 && n <= data.len(), "{}", path.display());
        }
        if let Ok(Message::Request(req)) = parse_datagram(&data, 65536) {
            let response = ResponseBuilder::new(&req, 400, "Bad Request", Some("t")).build();
            assert!(
                matches!(parse_datagram(&response, 65536), Ok(Message::Response(_))),
                "{}: our 400 does not parse back",
                path.display()
            );
        }
    }
}

#[test]
fn sdp_seeds() {
    for (path, data) in seeds("sdp") {
        let Ok(offer) = sdp::parse(&data) else {
            continue;
        };
        let Ok(neg) = sdp::negotiate(&offer, &[Codec::Pcmu, Codec::Pcma]) else {
            continue;
        };
        let answer =
            sdp::build_answer_for_offer(&data, "127.0.0.1:10000".parse().unwrap(), 1, 1, &neg)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        sdp::parse(answer.as_bytes())
            .unwrap_or_else(|e| panic!("{}: answer does not parse back: {e}", path.display()));
    }
}

#[test]
fn rtp_dtmf_seeds() {
    for (_, data) in seeds("rtp_dtmf") {
        if let Ok(packet) = rtp::parse(&data) {
            let _ = TelephoneEvent::parse(packet.payload);
        }
        let mut detector = DtmfDetector::new();
        let mut now = Instant::now();
        for chunk in data.chunks(8) {
            if chunk.len() < 4 {
                break;
            }
            let ts = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let payload = &chunk[4..];
            now += Duration::from_millis(u64::from(payload.get(2).copied().unwrap_or(20)) * 4);
            if let Ok(Some(d)) = detector.on_packet(now, ts, payload) {
                assert!("0123456789*#ABCD".contains(d));
            }
        }
        for ct in ["application/dtmf-relay", "application/dtmf"] {
            if let Some(d) = dtmf_info_digit(ct, &data) {
                assert!("0123456789*#ABCD".contains(d));
            }
        }
    }
}

#[test]
fn menu_yaml_seeds() {
    let prompts =
        validate::PromptIndex::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts"))
            .unwrap();
    for (_, data) in seeds("menu_yaml") {
        let text = String::from_utf8(data).unwrap();
        let _ = schema::parse(&text);
        let _ = validate::check_text(Path::new("fuzz.yaml"), &text, &prompts);
    }
}

#[test]
fn ws_frame_seeds() {
    use ivr311::sip::transport::{ws_frame, TransportLimits};
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
    use tokio_tungstenite::tungstenite::Message as Ws;
    let max = TransportLimits::default().max_message_bytes;
    let mut requests = 0;
    for (path, data) in seeds("ws_frame") {
        let config = WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let mut ws =
            WebSocket::from_raw_socket(std::io::Cursor::new(data), Role::Server, Some(config));
        while let Ok(m) = ws.read() {
            let payload = match m {
                Ws::Text(t) => t.as_bytes().to_vec(),
                Ws::Binary(b) => b.to_vec(),
                _ => continue,
            };
            assert!(payload.len() <= max, "{}", path.display());
            let Some(parsed) = ws_frame(&payload, max) else {
                assert!(payload.iter().all(u8::is_ascii_whitespace));
                continue;
            };
            if let Ok(Message::Request(req)) = parsed {
                requests += 1;
                let response = ResponseBuilder::new(&req, 400, "Bad Request", Some("t")).build();
                assert!(
                    matches!(parse_datagram(&response, 65536), Ok(Message::Response(_))),
                    "{}: our 400 does not parse back",
                    path.display()
                );
            }
        }
    }
    assert!(
        requests >= 4,
        "the seeds carry SIP requests in frames: {requests}"
    );
}

#[test]
fn sdp_webrtc_seeds() {
    use ivr311::media::webrtc::{DtlsIdentity, WebRtcLeg};
    let mut webrtc = 0;
    for (path, data) in seeds("sdp_webrtc") {
        let Ok(sdp::Remote::WebRtc(offer, theirs)) = sdp::parse_any(&data) else {
            continue;
        };
        webrtc += 1;
        let mut leg = WebRtcLeg::new(DtlsIdentity::shared().unwrap(), Instant::now());
        let _ = leg.set_remote(Instant::now(), theirs);
        let Ok(neg) = sdp::negotiate(&offer, &[Codec::Pcmu, Codec::Pcma]) else {
            continue;
        };
        let local = "127.0.0.1:10000".parse().unwrap();
        let Ok(answer) = sdp::build_webrtc_answer(&data, local, 1, 1, &neg, leg.local()) else {
            continue;
        };
        match sdp::parse_any(answer.as_bytes()) {
            Ok(sdp::Remote::WebRtc(media, ours)) => {
                assert_eq!(media.addr, local, "{}", path.display());
                assert_eq!(ours.ice_ufrag, leg.local().ice_ufrag, "{}", path.display());
            }
            other => panic!("{}: our answer reads back as {other:?}", path.display()),
        }
    }
    assert!(webrtc >= 2, "the seeds hold browser SDP: {webrtc}");
}
