//! The browser in the WebRTC tests (`tests/webrtc.rs`, `tests/webrtc_load.rs`): an agent's
//! SIP over WebSocket ([`WsAgent`]), and its media from webrtc-rs's sans-IO peer connection
//! (`rtc`: full ICE, DTLS client, SRTP) on a UDP socket of its own ([`Browser`]). Included by
//! those files with `#[path]`, not from `common/mod.rs`, so other tests do not link `rtc`.
#![allow(dead_code)]

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use ivr311::media::g711::Codec;
use ivr311::sip::message::{parse_datagram, Message, Request, ResponseBuilder};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MediaEngine, MIME_TYPE_PCMU};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::RTCPeerConnectionBuilder;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An agent's browser, signalling side: SIP over a WebSocket to `GET /sip`.
pub struct WsAgent {
    id: String,
    ws: Ws,
}

fn sha256_hex(data: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn digest_param(challenge: &str, name: &str) -> Option<String> {
    let rest = challenge.strip_prefix("Digest ")?;
    rest.split(", ").find_map(|part| {
        let (k, v) = part.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
    })
}

impl WsAgent {
    /// Open `ws://HTTP/sip` with the `sip` subprotocol and log agent `id` in (digest SHA-256,
    /// password `pw<id>`) with a `;transport=ws` Contact, as JsSIP does.
    pub async fn login(http: SocketAddr, domain: SocketAddr, id: &str) -> WsAgent {
        let mut req = format!("ws://{http}/sip").into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "sip".parse().unwrap());
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("sip")
        );
        let mut a = WsAgent { id: id.into(), ws };
        let uri = format!("sip:{domain}");
        let reg = |cseq: u32, auth: Option<String>| {
            format!(
                "REGISTER {uri} SIP/2.0\r\nVia: SIP/2.0/WS b{id}.invalid;branch=z9hG4bKwsreg{cseq}{id}\r\nMax-Forwards: 70\r\n\
From: <sip:{id}@{domain}>;tag=w{id}\r\nTo: <sip:{id}@{domain}>\r\nCall-ID: wsreg-{id}\r\nCSeq: {cseq} REGISTER\r\n\
Contact: <sip:{id}@b{id}.invalid;transport=ws>\r\nExpires: 600\r\n{}Content-Length: 0\r\n\r\n",
                auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default()
            )
        };
        a.send(reg(1, None).into()).await;
        let challenge = match a.recv(Duration::from_secs(3)).await {
            Some(Message::Response(r)) => r,
            other => panic!("expected a challenge, got {other:?}"),
        };
        assert_eq!(challenge.code, 401);
        let c = challenge
            .headers_named("WWW-Authenticate")
            .find(|c| digest_param(c, "algorithm").as_deref() == Some("SHA-256"))
            .expect("SHA-256 challenge")
            .to_owned();
        let (realm, nonce, opaque) = (
            digest_param(&c, "realm").unwrap(),
            digest_param(&c, "nonce").unwrap(),
            digest_param(&c, "opaque").unwrap(),
        );
        let ha1 = sha256_hex(&format!("{id}:{realm}:pw{id}"));
        let ha2 = sha256_hex(&format!("REGISTER:{uri}"));
        let resp = sha256_hex(&format!("{ha1}:{nonce}:00000001:abcdef:auth:{ha2}"));
        let auth = format!(
            "Digest username=\"{id}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{resp}\", \
algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"abcdef\", opaque=\"{opaque}\""
        );
        a.send(reg(2, Some(auth)).into()).await;
        match a.recv(Duration::from_secs(3)).await {
            Some(Message::Response(r)) => assert_eq!(r.code, 200, "agent {id} logged in"),
            other => panic!("expected 200, got {other:?}"),
        }
        a
    }

    pub async fn send(&mut self, msg: Bytes) {
        let text = String::from_utf8(msg.to_vec()).unwrap();
        self.ws.send(WsMessage::text(text)).await.unwrap();
    }

    pub async fn recv(&mut self, t: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??
                .ok()?;
            match m {
                WsMessage::Text(t) => return Some(parse_datagram(t.as_bytes(), 65536).unwrap()),
                WsMessage::Binary(b) => return Some(parse_datagram(&b, 65536).unwrap()),
                _ => continue,
            }
        }
    }

    /// Wait for a request with `method`; other messages are skipped.
    pub async fn request(&mut self, method: &str, t: Duration) -> Request {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Some(Message::Request(r)) if r.method.as_str() == method => return r,
                Some(_) => continue,
                None => panic!("browser {} got no {method} within {t:?}", self.id),
            }
        }
    }

    pub async fn reply(&mut self, req: &Request, code: u16, reason: &str, sdp: Option<String>) {
        let mut b = ResponseBuilder::new(req, code, reason, Some(&format!("br{}", self.id)))
            .header(
                "Contact",
                format!("<sip:{}@b{}.invalid;transport=ws>", self.id, self.id),
            );
        if let Some(sdp) = sdp {
            b = b.body("application/sdp", sdp);
        }
        self.send(b.build()).await;
    }
}

/// Samples of a tone at `freq` Hz, 160 of them (a whole number of periods for 400 and 1000 Hz).
pub fn tone(freq: f32) -> Vec<i16> {
    (0..160)
        .map(|i| ((i as f32 * std::f32::consts::TAU * freq / 8000.0).sin() * 12000.0) as i16)
        .collect()
}

/// The share (0 to 1) of a block's energy at `freq` (Goertzel).
pub fn tone_share(block: &[i16], freq: f32) -> f32 {
    let n = block.len() as f32;
    let k = (n * freq / 8000.0).round();
    let w = std::f32::consts::TAU * k / n;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0f32, 0f32);
    let mut energy = 0f32;
    for &x in block {
        let x = x as f32;
        energy += x * x;
        let s = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    if energy < 1.0 {
        return 0.0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    power / (energy * n / 2.0)
}

/// How many 20 ms PCMU payloads are mostly a tone at `freq`.
pub fn tone_frames(payloads: &[Vec<u8>], freq: f32) -> usize {
    payloads
        .iter()
        .filter(|p| p.len() == 160)
        .filter(|p| {
            let mut pcm = [0i16; 160];
            Codec::Pcmu.decode(p, &mut pcm);
            tone_share(&pcm, freq) > 0.6
        })
        .count()
}

/// The browser's media: webrtc-rs's peer connection on a UDP socket of its own, answering the
/// server's offer, sending a 1 kHz tone once connected, keeping what it hears.
pub struct Browser {
    pub heard: Arc<Mutex<Vec<Vec<u8>>>>,
    /// RFC 4733 event payloads received (payload type 101).
    pub events: Arc<Mutex<Vec<Vec<u8>>>>,
    /// For each packet from the server after the first: |Δarrival − Δtimestamp| in ms.
    pub jitter_ms: Arc<Mutex<Vec<f32>>>,
    pub connected: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Browser {
    /// Answer `offer`; returns the browser and its answer SDP.
    pub async fn answer(offer: &str) -> (Browser, String) {
        let mut media = MediaEngine::default();
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: RTCRtpCodec {
                        mime_type: MIME_TYPE_PCMU.to_owned(),
                        clock_rate: 8000,
                        channels: 0,
                        sdp_fmtp_line: String::new(),
                        rtcp_feedback: vec![],
                    },
                    payload_type: 0,
                },
                RtpCodecKind::Audio,
            )
            .unwrap();
        // RFC 4733 keys, at the payload type ivr311 offers them.
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: RTCRtpCodec {
                        mime_type: "audio/telephone-event".to_owned(),
                        clock_rate: 8000,
                        channels: 0,
                        sdp_fmtp_line: "0-16".to_owned(),
                        rtcp_feedback: vec![],
                    },
                    payload_type: 101,
                },
                RtpCodecKind::Audio,
            )
            .unwrap();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_media_engine(media)
            .build(Instant::now())
            .unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = sock.local_addr().unwrap();
        pc.set_remote_description(
            Instant::now(),
            RTCSessionDescription::offer(offer.to_owned()).unwrap(),
        )
        .unwrap();
        let ssrc = rand::random::<u32>();
        let track = MediaStreamTrack::new(
            "browser-stream".to_owned(),
            "browser-audio".to_owned(),
            "browser-audio".to_owned(),
            RtpCodecKind::Audio,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_PCMU.to_owned(),
                    clock_rate: 8000,
                    channels: 0,
                    sdp_fmtp_line: String::new(),
                    rtcp_feedback: vec![],
                },
                ..Default::default()
            }],
        );
        let sender = pc.add_track(track).unwrap();
        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: local.ip().to_string(),
                port: local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()
        .unwrap();
        pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json().unwrap())
            .unwrap();
        let answer = pc.create_answer(None).unwrap();
        pc.set_local_description(Instant::now(), answer.clone())
            .unwrap();
        // The answer as it goes out, with the candidate (no trickle over SIP).
        let sdp = pc
            .local_description()
            .map(|d| d.sdp.clone())
            .unwrap_or(answer.sdp);

        let heard = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let events2 = events.clone();
        let jitter_ms = Arc::new(Mutex::new(Vec::new()));
        let jitter2 = jitter_ms.clone();
        let mut last: Option<(Instant, u32)> = None;
        let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (heard2, connected2) = (heard.clone(), connected.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let payload = {
                let mut p = [0u8; 160];
                Codec::Pcmu.encode(&tone(1000.0), &mut p);
                Bytes::copy_from_slice(&p)
            };
            let (mut seq, mut ts) = (rand::random::<u16>(), rand::random::<u32>());
            let mut next_send = tokio::time::Instant::now();
            loop {
                while let Some(msg) = pc.poll_write() {
                    let _ = sock.send_to(&msg.message, msg.transport.peer_addr).await;
                }
                while let Some(ev) = pc.poll_event() {
                    if let rtc::peer_connection::event::RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                        if s == rtc::peer_connection::state::RTCPeerConnectionState::Connected {
                            connected2.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
                while let Some(m) = pc.poll_read() {
                    if let RTCMessage::RtpPacket(_, p) = m.message {
                        match p.header.payload_type {
                            101 => events2.lock().unwrap().push(p.payload.to_vec()),
                            _ => heard2.lock().unwrap().push(p.payload.to_vec()),
                        }
                    }
                }
                let timeout = pc
                    .poll_timeout()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
                    .min(Instant::now() + Duration::from_millis(20));
                tokio::select! {
                    _ = tokio::time::sleep_until(timeout.into()) => {
                        let _ = pc.handle_timeout(Instant::now());
                    }
                    _ = tokio::time::sleep_until(next_send) => {
                        next_send += Duration::from_millis(20);
                        if !connected2.load(std::sync::atomic::Ordering::SeqCst) {
                            continue;
                        }
                        if let Some(mut s) = pc.rtp_sender(sender) {
                            let packet = rtc::rtp::packet::Packet {
                                header: rtc::rtp::header::Header {
                                    version: 2,
                                    payload_type: 0,
                                    sequence_number: seq,
                                    timestamp: ts,
                                    ssrc,
                                    ..Default::default()
                                },
                                payload: payload.clone(),
                            };
                            let _ = s.write_rtp(Instant::now(), packet);
                        }
                        seq = seq.wrapping_add(1);
                        ts = ts.wrapping_add(160);
                    }
                    r = sock.recv_from(&mut buf) => {
                        let Ok((n, peer)) = r else { return };
                        // SRTP leaves the RTP header in the clear: the jitter is taken as
                        // the datagram arrives, not when the peer connection hands it over.
                        if n >= 12 && (128..=191).contains(&buf[0]) && !(200..=204).contains(&buf[1]) {
                            let at = Instant::now();
                            let ts = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                            if let Some((t0, ts0)) = last {
                                let sent = ts.wrapping_sub(ts0) as i32 as f32 / 8.0;
                                let got = at.duration_since(t0).as_secs_f32() * 1000.0;
                                jitter2.lock().unwrap().push((got - sent).abs());
                            }
                            last = Some((at, ts));
                        }
                        let _ = pc.handle_read(TaggedBytesMut {
                            now: Instant::now(),
                            transport: TransportContext {
                                local_addr: local,
                                peer_addr: peer,
                                ecn: None,
                                transport_protocol: TransportProtocol::UDP,
                            },
                            message: bytes::BytesMut::from(&buf[..n]),
                        });
                    }
                }
            }
        });
        (
            Browser {
                heard,
                events,
                jitter_ms,
                connected,
                task,
            },
            sdp,
        )
    }

    pub fn heard(&self) -> Vec<Vec<u8>> {
        self.heard.lock().unwrap().clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.task.abort();
    }
}
