//! Media hot paths: G.711 per 20 ms frame, RFC 4733 detection, the per-call RTP send tick for
//! N calls, and the bridge relay step.
//!
//! Inputs are real: the shipped prompt `prompts/en/main_menu.wav` (the main menu every caller
//! hears), SIPp's captured RFC 4733 digit `1` (`benches/data/dtmf_2833_1.pcap`, a copy of
//! sip-tester 3.6.1's `/usr/share/sip-tester/dtmf_2833_1.pcap`: one start packet, six
//! continuations, three End packets) and the first 50 packets of SIPp's caller audio
//! (`benches/data/g711a_50.pcap`, from `g711a.pcap`: PCMA, 30 ms per packet).
//!
//! Run: `cargo bench --bench media`. See BENCHMARKS.md for figures.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ivr311::media::bridge::{relay, Relay};
use ivr311::media::dtmf::DtmfDetector;
use ivr311::media::g711::Codec;
use ivr311::media::prompt::Prompt;
use ivr311::media::rtp::{self, RtpStream};
use ivr311::media::sdp::{Direction, Negotiated};
use ivr311::media::session::{MediaEvent, MediaSession, FRAME_SAMPLES, MAX_PACKET};
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::measured;

const DTMF_PCAP: &[u8] = include_bytes!("data/dtmf_2833_1.pcap");
const AUDIO_PCAP: &[u8] = include_bytes!("data/g711a_50.pcap");

/// The UDP payloads of a classic little-endian pcap of Ethernet/IPv4/UDP packets.
fn pcap_udp_payloads(pcap: &[u8]) -> Vec<Vec<u8>> {
    let u32_at = |i: usize| u32::from_le_bytes(pcap[i..i + 4].try_into().expect("4 bytes"));
    assert_eq!(u32_at(0), 0xa1b2_c3d4, "little-endian pcap, µs timestamps");
    assert_eq!(u32_at(20), 1, "Ethernet link type");
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32_at(at + 8) as usize;
        let frame = &pcap[at + 16..at + 16 + len];
        at += 16 + len;
        let ip = &frame[14..];
        assert_eq!(ip[0] >> 4, 4, "IPv4");
        assert_eq!(ip[9], 17, "UDP");
        let udp = &ip[usize::from(ip[0] & 0x0f) * 4..];
        let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        out.push(udp[8..udp_len].to_vec());
    }
    out
}

fn main_menu_prompt() -> Arc<Prompt> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts/en/main_menu.wav");
    Arc::new(Prompt::from_wav_file("main_menu", &path).expect("shipped prompt loads"))
}

/// What SIPp's INVITE negotiates: PCMA with telephone-event 101.
fn pcma() -> Negotiated {
    Negotiated {
        codec: Codec::Pcma,
        payload_type: 8,
        telephone_event: Some(101),
        direction: Direction::SendRecv,
    }
}

fn pcmu() -> Negotiated {
    Negotiated {
        codec: Codec::Pcmu,
        payload_type: 0,
        telephone_event: Some(101),
        direction: Direction::SendRecv,
    }
}

fn caller() -> SocketAddr {
    "127.0.0.1:6000".parse().expect("address")
}

fn g711(c: &mut Criterion) {
    let prompt = main_menu_prompt();
    // A voiced 20 ms frame from the middle of the prompt.
    let at = prompt.pcm().len() / 2;
    let pcm: [i16; FRAME_SAMPLES] = prompt.pcm()[at..at + FRAME_SAMPLES]
        .try_into()
        .expect("frame");
    assert!(pcm.iter().any(|s| s.unsigned_abs() > 1000), "voiced frame");
    let ulaw: [u8; FRAME_SAMPLES] = prompt.encoded(Codec::Pcmu)[at..at + FRAME_SAMPLES]
        .try_into()
        .expect("frame");
    let alaw: [u8; FRAME_SAMPLES] = prompt.encoded(Codec::Pcma)[at..at + FRAME_SAMPLES]
        .try_into()
        .expect("frame");

    let mut g = c.benchmark_group("g711/frame_20ms");
    g.throughput(Throughput::Elements(FRAME_SAMPLES as u64));
    for (name, codec) in [("ulaw", Codec::Pcmu), ("alaw", Codec::Pcma)] {
        let mut out = [0u8; FRAME_SAMPLES];
        g.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                measured(|| {
                    codec.encode(black_box(&pcm), &mut out);
                    out
                })
            })
        });
        let enc = if codec == Codec::Pcmu { ulaw } else { alaw };
        let mut out = [0i16; FRAME_SAMPLES];
        g.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| {
                measured(|| {
                    codec.decode(black_box(&enc), &mut out);
                    out
                })
            })
        });
    }
    let mut out = [0u8; FRAME_SAMPLES];
    g.bench_function("transcode_pcmu_to_pcma", |b| {
        b.iter(|| {
            measured(|| {
                Codec::transcode(Codec::Pcmu, Codec::Pcma, black_box(&ulaw), &mut out);
                out
            })
        })
    });
    g.bench_function("transcode_pcma_to_pcmu", |b| {
        b.iter(|| {
            measured(|| {
                Codec::transcode(Codec::Pcma, Codec::Pcmu, black_box(&alaw), &mut out);
                out
            })
        })
    });
    g.finish();
}

fn dtmf(c: &mut Criterion) {
    let digit = pcap_udp_payloads(DTMF_PCAP);
    assert_eq!(digit.len(), 10, "start, 6 continuations, 3 Ends");
    let audio = pcap_udp_payloads(AUDIO_PCAP);
    assert_eq!(audio.len(), 50);
    let t0 = Instant::now();
    let from = caller();
    // Packets arrive 20 ms apart (the three Ends back to back, as SIPp's capture has them).
    let arrival = |i: usize| t0 + Duration::from_millis(20 * i.min(7) as u64);

    let mut g = c.benchmark_group("dtmf");
    // The detector alone, after the session's RTP parse, for one whole key press.
    let parsed: Vec<(u32, Vec<u8>)> = digit
        .iter()
        .map(|p| {
            let p = rtp::parse(p).expect("RTP");
            assert_eq!(p.payload_type, 101);
            (p.timestamp, p.payload.to_vec())
        })
        .collect();
    g.throughput(Throughput::Elements(digit.len() as u64));
    g.bench_function("detector_one_digit_10_packets", |b| {
        b.iter(|| {
            measured(|| {
                let mut d = DtmfDetector::new();
                let mut keys = 0;
                for (i, (ts, payload)) in parsed.iter().enumerate() {
                    if let Ok(Some(_)) = d.on_packet(arrival(i), *ts, black_box(payload)) {
                        keys += 1;
                    }
                }
                assert_eq!(keys, 1);
            })
        })
    });
    // The same packets through the whole receive path of a call (RTP parse, symmetric-RTP
    // latch, payload-type check, detector): `MediaSession::on_rtp`.
    g.bench_function("session_on_rtp_one_digit_10_packets", |b| {
        b.iter_batched_ref(
            || MediaSession::new(t0, pcma(), from),
            |m| {
                measured(|| {
                    let mut keys = 0;
                    for (i, p) in digit.iter().enumerate() {
                        if let Ok(Some(MediaEvent::Digit('1'))) =
                            m.on_rtp(arrival(i), from, black_box(p))
                        {
                            keys += 1;
                        }
                    }
                    assert_eq!(keys, 1);
                })
            },
            BatchSize::SmallInput,
        )
    });
    // Caller audio with no event: what arrives 50 times a second per call.
    g.throughput(Throughput::Elements(audio.len() as u64));
    let mut m = MediaSession::new(t0, pcma(), from);
    g.bench_function("session_on_rtp_audio_50_packets", |b| {
        b.iter(|| {
            measured(|| {
                for p in &audio {
                    let r = m.on_rtp(t0, from, black_box(p));
                    debug_assert!(matches!(r, Ok(None)));
                }
            })
        })
    });
    assert_eq!(
        m.stats.malformed_in + m.stats.foreign_in + m.stats.digits,
        0
    );
    g.finish();
}

/// One tick for every call: each writes its packet into its slot of `batch`. Not inlined, so
/// that profiles name it.
#[inline(never)]
fn tick_all(
    calls: &mut [MediaSession],
    batch: &mut [[u8; MAX_PACKET]],
    lens: &mut [usize],
    prompt: &Arc<Prompt>,
) {
    for ((m, out), len) in calls.iter_mut().zip(batch).zip(lens) {
        let (sent, ev) = m.on_tick(out);
        *len = sent;
        if ev == Some(MediaEvent::PlayDone) {
            m.play([prompt.clone()]);
        }
    }
}

/// One 20 ms send tick for `n` calls, each playing the shared main-menu prompt (queued again
/// when it ends, as the menu would), into one batch buffer as a sendmmsg driver would fill.
fn tick(c: &mut Criterion) {
    let prompt = main_menu_prompt();
    let t0 = Instant::now();
    let mut g = c.benchmark_group("rtp_tick");
    for n in [1usize, 100, 3000] {
        let mut calls: Vec<MediaSession> = (0..n)
            .map(|i| {
                let neg = if i % 2 == 0 { pcma() } else { pcmu() };
                let mut m = MediaSession::new(t0, neg, caller());
                m.play([prompt.clone()]);
                // Stagger the calls through the prompt, as real calls would be.
                let mut out = [0u8; MAX_PACKET];
                for _ in 0..(i * 7) % prompt.frames() {
                    m.on_tick(&mut out);
                }
                m
            })
            .collect();
        let mut batch = vec![[0u8; MAX_PACKET]; n];
        let mut lens = vec![0usize; n];
        tick_all(&mut calls, &mut batch, &mut lens, &prompt);
        assert!(lens.iter().all(|l| *l == rtp::HEADER_LEN + FRAME_SAMPLES));
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("calls", n), |b| {
            b.iter(|| {
                measured(|| {
                    tick_all(&mut calls, &mut batch, &mut lens, &prompt);
                    black_box(&lens);
                })
            })
        });
    }
    g.finish();
}

/// One caller packet relayed to the other leg (operator or 911 trunk), in place.
fn bridge(c: &mut Criterion) {
    // A 20 ms packet of the caller's real PCMA audio.
    let audio = pcap_udp_payloads(AUDIO_PCAP);
    let first = rtp::parse(&audio[10]).expect("RTP");
    let mut s = RtpStream::with_origin(first.ssrc, first.sequence, first.timestamp);
    let mut packet = [0u8; MAX_PACKET];
    let len = s.write(8, &first.payload[..FRAME_SAMPLES], 160, &mut packet);

    let from = pcma();
    let mut g = c.benchmark_group("bridge_relay");
    for (name, to) in [("pcma_to_pcma", pcma()), ("pcma_to_pcmu_transcode", pcmu())] {
        let mut buf = [0u8; 1500];
        g.bench_function(name, |b| {
            b.iter(|| {
                measured(|| {
                    // The packet as received (the driver receives into this buffer anyway).
                    buf[..len].copy_from_slice(&packet[..len]);
                    let r = relay(black_box(&mut buf), len, &from, &to);
                    debug_assert_eq!(r, Relay::Forward { len, event: false });
                    r
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, g711, dtmf, tick, bridge);
criterion_main!(benches);
