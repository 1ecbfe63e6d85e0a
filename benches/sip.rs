//! SIP hot paths, per inbound message: framing + compact-form normalisation + parsing
//! (`sip::message::parse_datagram`), and the server-transaction lookup the UA core does for
//! every request (`ServerKey::of` + a `HashMap` probe in a table of ~3000 live transactions).
//!
//! Inputs are real messages: the INVITE SIPp 3.6.1 sends with `tests/sipp/uac_pothole.xml`
//! (captured off the wire into `benches/data/sipp_invite.sip`), the same INVITE in compact
//! form, the compact/folded OPTIONS of `src/sip/message.rs`'s unit tests, and RFC 4475's
//! "short tortuous INVITE" (`tests/torture/wsinv.dat`).
//!
//! Run: `cargo bench --bench sip`. See BENCHMARKS.md for figures.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ivr311::sip::message::{normalise_headers, parse_datagram, Message, Request};
use ivr311::sip::transaction::ServerTransaction;
use ivr311::sip::transport::{Flow, Transport};
use ivr311::sip::ua::ServerKey;
use std::collections::HashMap;
use std::hint::black_box;

mod common;
use common::measured;

/// The datagram size limit the transport uses for UDP.
const LIMIT: usize = 65_535;

/// SIPp's INVITE (PCMA + telephone-event SDP), byte for byte as it came off the socket.
const SIPP_INVITE: &[u8] = include_bytes!("data/sipp_invite.sip");
/// RFC 4475 §3.1.1.1: compact forms, folding, odd whitespace and case everywhere.
const WSINV: &[u8] = include_bytes!("../tests/torture/wsinv.dat");
/// The compact-form, folded OPTIONS of the unit tests in src/sip/message.rs.
const COMPACT_OPTIONS: &str = "OPTIONS sip:311@h SIP/2.0\r\n\
v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx\r\n\
f: <sip:a@h>;tag=1\r\n\
t: <sip:311@h>\r\n\
i: cid\r\n\
CSeq: 7\r\n OPTIONS\r\n\
m: <sip:a@10.0.0.1>\r\n\
k: timer\r\n\
s: folded\r\n\tsubject\r\n\
c: text/plain\r\n\
l: 2\r\n\r\nhi";

/// Live server transactions in the table, as at ~3000 concurrent calls.
const LIVE: usize = 3000;

/// The SIPp INVITE with every header that has a compact form written in it (what a phone
/// squeezing a message under the MTU sends).
fn compact_invite() -> Vec<u8> {
    let text = std::str::from_utf8(SIPP_INVITE).expect("UTF-8");
    let mut out = String::new();
    for line in text.split_inclusive("\r\n") {
        let compact = [
            ("Via: ", "v: "),
            ("From: ", "f: "),
            ("To: ", "t: "),
            ("Call-ID: ", "i: "),
            ("Contact: ", "m: "),
            ("Subject: ", "s: "),
            ("Content-Type: ", "c: "),
            ("Content-Length: ", "l: "),
        ]
        .iter()
        .find_map(|(long, short)| line.strip_prefix(long).map(|rest| format!("{short}{rest}")));
        out.push_str(compact.as_deref().unwrap_or(line));
    }
    out.into_bytes()
}

/// SIPp's INVITE for call number `n`: SIPp varies branch, From tag and Call-ID per call.
fn sipp_invite_n(n: usize) -> Vec<u8> {
    let text = std::str::from_utf8(SIPP_INVITE).expect("UTF-8");
    text.replace(
        "branch=z9hG4bK-780-1-0",
        &format!("branch=z9hG4bK-780-{n}-0"),
    )
    .replace("tag=780SIPpTag001", &format!("tag=780SIPpTag00{n}"))
    .replace("Call-ID: 1-780@", &format!("Call-ID: {n}-780@"))
    .into_bytes()
}

fn request(bytes: &[u8]) -> Request {
    match parse_datagram(bytes, LIMIT).expect("bench message parses") {
        Message::Request(r) => r,
        Message::Response(_) => panic!("bench message is a request"),
    }
}

fn parse(c: &mut Criterion) {
    let compact = compact_invite();
    // The compact form must say the same thing as the long form.
    let (a, b) = (request(SIPP_INVITE), request(&compact));
    assert_eq!((a.call_id.as_str(), a.cseq), (b.call_id.as_str(), b.cseq));
    assert_eq!(a.header("Subject"), b.header("Subject"));
    assert_eq!(a.body, b.body);

    let mut g = c.benchmark_group("sip/parse");
    for (name, msg) in [
        ("invite_sdp_sipp", SIPP_INVITE),
        ("invite_sdp_sipp_compact", &compact[..]),
        ("options_compact_folded", COMPACT_OPTIONS.as_bytes()),
        ("rfc4475_wsinv", WSINV),
    ] {
        request(msg);
        g.throughput(Throughput::Bytes(msg.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| measured(|| parse_datagram(black_box(msg), LIMIT).expect("parses")))
        });
    }
    g.finish();

    // Normalisation alone (unfolding + compact names), the step in front of rsip.
    let mut g = c.benchmark_group("sip/normalise");
    for (name, msg) in [
        ("invite_sdp_sipp", SIPP_INVITE),
        ("invite_sdp_sipp_compact", &compact[..]),
    ] {
        let text = std::str::from_utf8(msg).expect("UTF-8");
        let head = &text[..text.find("\r\n\r\n").expect("header end") + 4];
        g.bench_function(name, |b| {
            b.iter(|| measured(|| normalise_headers(black_box(head)).expect("normalises")))
        });
    }
    g.finish();
}

/// What the UA core keeps per server transaction (`ServerEntry` in src/sip/ua/core.rs, private):
/// the state machine, the flow and the request.
type Entry = (u64, (ServerTransaction, Flow, Request));

fn table() -> HashMap<ServerKey, Entry> {
    let flow = Flow {
        transport: Transport::Udp,
        remote: "127.0.0.1:5060".parse().expect("address"),
        conn: 0,
    };
    let mut table = HashMap::new();
    for n in 1..=LIVE {
        let req = request(&sipp_invite_n(n));
        let key = ServerKey::of(&req);
        let tx = ServerTransaction::new(true, false);
        table.insert(key, (n as u64, (tx, flow, req)));
    }
    assert_eq!(table.len(), LIVE);
    table
}

fn transaction_lookup(c: &mut Criterion) {
    let mut table = table();
    // A retransmitted INVITE of a live call (hit) and the INVITE of a new call (miss): what
    // `UaCore::on_request` does first for every request.
    let retrans = request(&sipp_invite_n(LIVE / 2));
    let fresh_bytes = sipp_invite_n(LIVE + 1);
    let fresh = request(&fresh_bytes);
    assert!(table.contains_key(&ServerKey::of(&retrans)));
    assert!(!table.contains_key(&ServerKey::of(&fresh)));

    let mut g = c.benchmark_group("sip/txn_lookup_3000");
    g.bench_function("key_and_hit", |b| {
        b.iter(|| {
            measured(|| {
                let key = ServerKey::of(black_box(&retrans));
                table.get_mut(&key).map(|(id, _)| *id)
            })
        })
    });
    g.bench_function("key_and_miss", |b| {
        b.iter(|| {
            measured(|| {
                let key = ServerKey::of(black_box(&fresh));
                table.get_mut(&key).map(|(id, _)| *id)
            })
        })
    });
    g.finish();

    // One new call's INVITE end to end on the UA side of the transport: parse, key, probe,
    // insert the new transaction; and its removal when it terminates, so the table stays at
    // 3000 (both are per-call work).
    let flow = Flow {
        transport: Transport::Udp,
        remote: "127.0.0.1:5060".parse().expect("address"),
        conn: 0,
    };
    let mut g = c.benchmark_group("sip/per_message_3000");
    g.bench_function("invite_parse_key_insert_remove", |b| {
        b.iter(|| {
            measured(|| {
                let req = request(black_box(&fresh_bytes));
                let key = ServerKey::of(&req);
                if table.get_mut(&key).is_none() {
                    let tx = ServerTransaction::new(true, false);
                    table.insert(key.clone(), (0, (tx, flow, req)));
                }
                table.remove(&key).map(|(id, _)| id)
            })
        })
    });
    g.finish();
}

criterion_group!(benches, parse, transaction_lookup);
criterion_main!(benches);
