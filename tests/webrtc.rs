//! Browser operators (WebRTC): an agent whose phone is a browser registers over SIP over
//! WebSocket (RFC 7118), is offered a caller who pressed 0 with a WebRTC offer, answers from a
//! real WebRTC stack (webrtc-rs's `rtc` peer connection: full ICE, DTLS client, SRTP), and
//! talks with the caller through the server's media clock; then its WebSocket is lost and the
//! caller goes back to the front of the queue.

mod common;

use bytes::Bytes;
use common::*;
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

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An agent's browser, signalling side: SIP over a WebSocket to `GET /sip`.
struct WsAgent {
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
    async fn login(http: SocketAddr, domain: SocketAddr, id: &str) -> WsAgent {
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

    async fn send(&mut self, msg: Bytes) {
        let text = String::from_utf8(msg.to_vec()).unwrap();
        self.ws.send(WsMessage::text(text)).await.unwrap();
    }

    async fn recv(&mut self, t: Duration) -> Option<Message> {
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
    async fn request(&mut self, method: &str, t: Duration) -> Request {
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

    async fn reply(&mut self, req: &Request, code: u16, reason: &str, sdp: Option<String>) {
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
fn tone(freq: f32) -> Vec<i16> {
    (0..160)
        .map(|i| ((i as f32 * std::f32::consts::TAU * freq / 8000.0).sin() * 12000.0) as i16)
        .collect()
}

/// The share (0 to 1) of a block's energy at `freq` (Goertzel).
fn tone_share(block: &[i16], freq: f32) -> f32 {
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
fn tone_frames(payloads: &[Vec<u8>], freq: f32) -> usize {
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
struct Browser {
    heard: Arc<Mutex<Vec<Vec<u8>>>>,
    connected: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Browser {
    /// Answer `offer`; returns the browser and its answer SDP.
    async fn answer(offer: &str) -> (Browser, String) {
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
                        heard2.lock().unwrap().push(p.payload.to_vec());
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
                connected,
                task,
            },
            sdp,
        )
    }

    fn heard(&self) -> Vec<Vec<u8>> {
        self.heard.lock().unwrap().clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn admin_post(srv: &ivr311::server::RunningServer, path: &str) -> u16 {
    let json = [("Content-Type", "application/json")];
    http(srv.http_addr, "POST", path, &json, b"{}").await.0
}

/// Poll `GET /admin/queues` until the `general` queue has `want` callers waiting.
async fn until_waiting(http_addr: SocketAddr, want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = http(http_addr, "GET", "/admin/queues", &[], b"").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let waiting = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|q| q["name"] == "general")
            .and_then(|q| q["waiting"].as_u64());
        if waiting == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue never had {want} waiting: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_agent_answers_over_webrtc_hears_and_is_heard_and_a_lost_websocket_requeues_the_caller(
) {
    let srv = start_server(agents_config(&["1001", "1002"], 20, 0)).await;
    // A desk phone logged in but paused keeps the queue open without taking calls.
    let phone = TestAgent::login(srv.sip_addr, "1002").await;
    assert_eq!(admin_post(&srv, "/admin/agents/1002/pause").await / 100, 2);
    let mut agent = WsAgent::login(srv.http_addr, srv.sip_addr, "1001").await;
    let mut caller = caller_pressing(srv.sip_addr, "110").await;

    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    let offer = String::from_utf8(inv.body.to_vec()).unwrap();
    for part in [
        "m=audio ",
        "UDP/TLS/RTP/SAVPF",
        "a=ice-lite",
        "a=ice-ufrag:",
        "a=ice-pwd:",
        "a=fingerprint:sha-256 ",
        "a=setup:actpass",
        "a=rtcp-mux",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "telephone-event/8000",
        "a=candidate:",
    ] {
        assert!(offer.contains(part), "the offer has {part:?}:\n{offer}");
    }
    assert_eq!(inv.header("X-311-Queue"), Some("general"));
    let (browser, answer) = Browser::answer(&offer).await;
    agent.reply(&inv, 200, "OK", Some(answer)).await;
    agent.request("ACK", Duration::from_secs(3)).await;

    // ICE and DTLS-SRTP come up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !browser.connected.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The browser's tone reaches the caller, through SRTP and the media clock.
    let mut caller_heard = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tone_frames(&caller_heard, 1000.0) < 25 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the caller did not hear the browser's tone: {} of {} frames",
            tone_frames(&caller_heard, 1000.0),
            caller_heard.len()
        );
        caller_heard.extend(caller.listen(Duration::from_millis(100)).await);
    }
    // And the caller's 400 Hz reaches the browser.
    caller.speak(50).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tone_frames(&browser.heard(), 400.0) < 25 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser did not hear the caller's tone: {} of {} frames",
            tone_frames(&browser.heard(), 400.0),
            browser.heard().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A second caller waits behind the first.
    let second = caller_pressing(srv.sip_addr, "110").await;
    until_waiting(srv.http_addr, 1).await;

    // The browser's connection drops mid-call: after the grace the first caller is back in
    // line, ahead of the second, and the next operator to be ready is offered that caller.
    drop(agent);
    until_waiting(srv.http_addr, 2).await;
    assert_eq!(
        admin_post(&srv, "/admin/agents/1002/unpause").await / 100,
        2
    );
    let offered = phone.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(
        offered.header("X-311-Call-ID"),
        Some(caller.call_id.as_str()),
        "the first caller is offered first (the second is {})",
        second.call_id
    );
    drop(browser);
}

/// Headless Chromium as the agent's phone: JsSIP, served by ivr311 itself, registers over
/// `ws://` and answers a caller who pressed 0 with the fake microphone, which plays a 1 kHz
/// tone; the caller hears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_jssip_registers_over_websocket_answers_and_the_caller_hears_its_microphone()
{
    use common::browser::{tone_wav, Browser, BrowserOptions};
    let srv = start_server(agents_config(&["1001"], 20, 0)).await;
    let wav = std::env::temp_dir().join(format!("ivr311-tone-{}.wav", rand::random::<u64>()));
    tone_wav(&wav, 1000.0, 5);
    let browser = Browser::start(BrowserOptions {
        fake_audio: Some(wav.clone()),
    })
    .await;
    // The page: any of ivr311's own (a secure context on 127.0.0.1, the same origin as /sip),
    // with JsSIP loaded from where ivr311 serves it.
    browser
        .goto(&format!("http://{}/health", srv.http_addr))
        .await;
    browser
        .execute(
            "const s = document.createElement('script'); \
             s.src = '/console/assets/jssip.min.js'; document.head.appendChild(s);",
            vec![],
        )
        .await;
    browser
        .wait_for(
            "JsSIP loaded",
            "return typeof JsSIP !== 'undefined' && JsSIP.version",
            Duration::from_secs(10),
        )
        .await;
    let agent_js =
        std::fs::read_to_string(repo().join("tests/fixtures/browser/jssip-agent.js")).unwrap();
    browser
        .execute(
            &agent_js,
            vec![
                format!("ws://{}/sip", srv.http_addr).into(),
                srv.sip_addr.to_string().into(),
                "1001".into(),
                "pw1001".into(),
            ],
        )
        .await;
    browser
        .wait_for(
            "the agent registered",
            "return window.agent.state.failed || window.agent.state.registered",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        browser
            .execute("return window.agent.state.failed", vec![])
            .await,
        serde_json::Value::Null
    );
    assert_eq!(agent_state(srv.http_addr, "1001").await, "available");

    let mut caller = caller_pressing(srv.sip_addr, "110").await;
    let incoming = browser
        .wait_for(
            "the call is offered",
            "return window.agent.state.incoming",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(incoming["queue"], "general", "{incoming}");
    assert_eq!(incoming["from"], "+15550001111", "{incoming}");
    browser.execute("window.agent.answer()", vec![]).await;
    browser
        .wait_for(
            "the call is up",
            "const s = window.agent.state; return s.failed || s.confirmed",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        browser
            .execute("return window.agent.state.failed", vec![])
            .await,
        serde_json::Value::Null
    );

    let mut heard = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tone_frames(&heard, 1000.0) < 25 {
        if tokio::time::Instant::now() >= deadline {
            let log = browser
                .execute("return window.agent.state.log", vec![])
                .await;
            browser.screenshot("silent").await;
            panic!(
                "the caller did not hear the browser's microphone: {} tone frames of {} (page: {log})",
                tone_frames(&heard, 1000.0),
                heard.len()
            );
        }
        heard.extend(caller.listen(Duration::from_millis(100)).await);
    }
    let _ = std::fs::remove_file(&wav);
}

/// The embedded JsSIP is served as the vendored file, revalidated by its entity tag.
#[tokio::test]
async fn jssip_is_served_from_the_binary() {
    let srv = start_server(ivr311::config::FileConfig::default()).await;
    let (status, body) = http(
        srv.http_addr,
        "GET",
        "/console/assets/jssip.min.js",
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let vendored = std::fs::read_to_string(repo().join("web/vendor/jssip/jssip.min.js")).unwrap();
    assert_eq!(body.len(), vendored.len());
    assert!(body.contains("JsSIP"));
}
