//! Parties on a call told apart by their tones, as a person tells voices apart: each party
//! (a test UA's RTP socket) sends its own sine tone, one PCMU packet each 20 ms as phones do,
//! and what each hears is judged by frequency (Goertzel).

use ivr311::media::dtmf::{digit_to_event, TelephoneEvent};
use ivr311::media::g711::Codec;
use ivr311::media::rtp::{self, RtpStream};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// The amplitude of `hz` in one 20 ms frame (Goertzel).
pub fn amplitude(frame: &[i16], hz: f64) -> f64 {
    let coeff = 2.0 * (std::f64::consts::TAU * hz / 8000.0).cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &x in frame {
        let s = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    2.0 * power.max(0.0).sqrt() / frame.len() as f64
}

/// Which of `tones` are in `pcm`: a tone counts when its median amplitude over the frames is
/// over 2000 (a quarter of what a [`Voice`] sends).
pub fn tones_in<const N: usize>(pcm: &[i16], tones: [f64; N]) -> [bool; N] {
    let frames: Vec<&[i16]> = pcm.chunks_exact(160).collect();
    if frames.is_empty() {
        return [false; N];
    }
    tones.map(|hz| {
        let mut a: Vec<f64> = frames.iter().map(|f| amplitude(f, hz)).collect();
        a.sort_by(|x, y| x.total_cmp(y));
        a[a.len() / 2] > 2000.0
    })
}

/// One party's media: its socket, where the server wants its RTP, its stream and its tone.
pub struct Voice<'a> {
    sock: &'a UdpSocket,
    to: SocketAddr,
    out: RtpStream,
    hz: f64,
    /// Samples sent so far (the tone's phase runs on across packets).
    n: u64,
}

impl<'a> Voice<'a> {
    pub fn new(sock: &'a UdpSocket, to: SocketAddr, hz: f64) -> Self {
        Voice {
            sock,
            to,
            out: RtpStream::new(),
            hz,
            n: 0,
        }
    }

    /// One packet of the tone (amplitude 8000).
    pub async fn send(&mut self) {
        let pcm: Vec<i16> = (0..160)
            .map(|i| {
                let t = (self.n + i) as f64 / 8000.0;
                ((t * std::f64::consts::TAU * self.hz).sin() * 8000.0) as i16
            })
            .collect();
        self.n += 160;
        let mut payload = [0u8; 160];
        Codec::Pcmu.encode(&pcm, &mut payload);
        let mut buf = [0u8; 200];
        let n = self.out.write(0, &payload, 160, &mut buf);
        self.sock.send_to(&buf[..n], self.to).await.unwrap();
    }

    /// A key (RFC 4733 at payload type 101: three packets, then three End packets), on the
    /// tone's stream.
    pub async fn key(&mut self, key: char) {
        let event = digit_to_event(key).unwrap();
        let ts = self.out.timestamp();
        let mut buf = [0u8; 64];
        for i in 0..6u16 {
            let ev = TelephoneEvent {
                event,
                end: i >= 3,
                volume: 10,
                duration: (i.min(3) + 1) * 160,
            };
            let n = self.out.write_at(101, ts, i == 0, &ev.write(), &mut buf);
            self.sock.send_to(&buf[..n], self.to).await.unwrap();
        }
        self.out.skip(960);
    }

    /// What arrived since the last look, decoded (PCMU audio only).
    pub fn heard(&self, into: &mut Vec<i16>) {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = self.sock.try_recv_from(&mut buf) {
            if let Ok(p) = rtp::parse(&buf[..n]) {
                if p.payload_type == 0 {
                    let mut pcm = vec![0i16; p.payload.len()];
                    Codec::Pcmu.decode(p.payload, &mut pcm);
                    into.extend_from_slice(&pcm);
                }
            }
        }
    }
}

/// Every party talks for `window`; which of `tones` each heard (the first 100 ms, which may
/// be from before a change, left out).
pub async fn talk<const N: usize>(
    voices: &mut [Voice<'_>],
    window: Duration,
    tones: [f64; N],
) -> Vec<[bool; N]> {
    let mut heard = vec![Vec::new(); voices.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        for (v, h) in voices.iter_mut().zip(heard.iter_mut()) {
            v.send().await;
            v.heard(h);
        }
    }
    heard
        .iter()
        .map(|h| tones_in(&h[h.len().min(800)..], tones))
        .collect()
}

/// Talk until what each party hears is `want` (which of `tones`), within `within`; panics
/// with what was heard last.
pub async fn until_heard<const N: usize>(
    voices: &mut [Voice<'_>],
    tones: [f64; N],
    want: &[[bool; N]],
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let got = talk(voices, Duration::from_millis(400), tones).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: heard {got:?}, expected {want:?} (tones {tones:?})"
        );
    }
}
