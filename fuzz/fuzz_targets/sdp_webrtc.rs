//! A browser's SDP (WebRTC audio: UDP/TLS/RTP/SAVPF with ICE and a DTLS fingerprint): read it
//! as any SDP is read (`parse_any`), and for a WebRTC one negotiate G.711, answer it as ivr311
//! answers a browser, read the answer back, and hand the far end's ICE and DTLS parameters to
//! a browser leg.
#![no_main]

use ivr311::media::g711::Codec;
use ivr311::media::sdp::{build_webrtc_answer, negotiate, parse_any, Remote};
use ivr311::media::webrtc::{DtlsIdentity, WebRtcLeg};
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let Ok(Remote::WebRtc(offer, theirs)) = parse_any(data) else {
        return;
    };
    let identity = DtlsIdentity::shared().expect("a DTLS certificate");
    let mut leg = WebRtcLeg::new(identity, Instant::now());
    // Any role and fingerprint hash the SDP names is taken or refused, never a panic.
    let _ = leg.set_remote(Instant::now(), theirs.clone());
    let Ok(neg) = negotiate(&offer, &[Codec::Pcmu, Codec::Pcma]) else {
        return;
    };
    let local = "127.0.0.1:10000".parse().unwrap();
    let Ok(answer) = build_webrtc_answer(data, local, 1, 1, &neg, leg.local()) else {
        return;
    };
    match parse_any(answer.as_bytes()) {
        Ok(Remote::WebRtc(media, ours)) => {
            assert_eq!(media.addr, local, "{answer}");
            assert_eq!(ours.ice_ufrag, leg.local().ice_ufrag, "{answer}");
            assert_eq!(ours.fingerprint, leg.local().fingerprint, "{answer}");
        }
        other => panic!("our answer to a browser does not read back as WebRTC: {other:?}\n{answer}"),
    }
});
