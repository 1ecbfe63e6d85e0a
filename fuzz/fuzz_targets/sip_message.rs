//! SIP wire format: datagram parsing, stream framing, and the 400 we would send back.
#![no_main]

use ivr311::sip::message::{frame_stream, parse_datagram, Frame, Message, ResponseBuilder};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 65536;

fuzz_target!(|data: &[u8]| {
    if let Ok(Frame::Complete(n) | Frame::KeepAlive(n)) = frame_stream(data, LIMIT) {
        assert!(
            n > 0 && n <= data.len(),
            "frame of {n} bytes in {}",
            data.len()
        );
    }
    if let Ok(Message::Request(req)) = parse_datagram(data, LIMIT) {
        let response = ResponseBuilder::new(&req, 400, "Bad Request", Some("t")).build();
        match parse_datagram(&response, LIMIT) {
            Ok(Message::Response(_)) => {}
            other => panic!(
                "our own 400 does not parse back as a response: {other:?}\n{}",
                String::from_utf8_lossy(&response)
            ),
        }
    }
});
