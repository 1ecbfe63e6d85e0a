//! SIP over WebSocket: the bytes a browser's connection carries after the upgrade, read as the
//! server reads them (tungstenite in the server role, with ivr311's frame and message bounds),
//! each text or binary message handed to `sip::transport::ws_frame`.
#![no_main]

use ivr311::sip::message::{Message, ResponseBuilder};
use ivr311::sip::transport::{ws_frame, TransportLimits};
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

fuzz_target!(|data: &[u8]| {
    let max = TransportLimits::default().max_message_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let mut ws = WebSocket::from_raw_socket(Cursor::new(data.to_vec()), Role::Server, Some(config));
    // Every read consumes input or fails; the input is finite.
    while let Ok(m) = ws.read() {
        let payload = match m {
            tungstenite::Message::Text(t) => t.as_bytes().to_vec(),
            tungstenite::Message::Binary(b) => b.to_vec(),
            _ => continue,
        };
        assert!(payload.len() <= max, "a message over the bound was read");
        let Some(parsed) = ws_frame(&payload, max) else {
            assert!(payload.iter().all(u8::is_ascii_whitespace));
            continue;
        };
        if let Ok(Message::Request(req)) = parsed {
            let resp = ResponseBuilder::new(&req, 400, "Bad Request", Some("t")).build();
            if !matches!(
                ivr311::sip::message::parse_datagram(&resp, usize::MAX),
                Ok(Message::Response(_))
            ) {
                panic!("our 400 to a request read from a frame does not parse back");
            }
        }
    }
});
