//! SDP offer/answer: parse an offer, negotiate G.711, build the answer and parse it back.
#![no_main]

use ivr311::media::g711::Codec;
use ivr311::media::sdp::{build_answer_for_offer, negotiate, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(offer) = parse(data) else {
        return;
    };
    let Ok(neg) = negotiate(&offer, &[Codec::Pcmu, Codec::Pcma]) else {
        return;
    };
    let local = "127.0.0.1:10000".parse().unwrap();
    let answer = build_answer_for_offer(data, local, 1, 1, &neg)
        .expect("an offer that parse() accepted must be answerable");
    if let Err(e) = parse(answer.as_bytes()) {
        panic!("our answer does not parse back: {e}\n{answer}");
    }
});
