//! One call's media, sans-IO: the prompt player, our RTP stream, the caller's DTMF, and
//! symmetric-RTP latching.
//!
//! The call task owns the socket and the 20 ms tick and drives a [`MediaSession`]:
//! [`MediaSession::on_rtp`] for each datagram that arrives, [`MediaSession::on_tick`] every
//! packet time. What comes out: bytes to send to [`MediaSession::remote`], and [`MediaEvent`]s
//! (a key pressed, the prompt queue ran dry). Prompts are shared `Arc`s, pre-encoded in both
//! G.711 laws at start-up, so playing one copies 160 bytes per tick (from the prompt straight
//! into the packet) and allocates nothing.
//!
//! While nothing is queued we keep sending silence: it keeps NAT bindings open and lets the
//! caller's phone see a live stream. On hold (the caller's SDP says sendonly or inactive) we
//! send nothing and the player pauses.
//!
//! A session for a call we answered starts [`MediaSession::until_confirmed`]: nothing is sent
//! (and the player waits) until the caller's ACK ([`MediaSession::confirm`]) or its first
//! valid RTP packet from an address the latch admits. An INVITE costs its sender one
//! datagram and can name any address in its SDP, and with a forged source it never sees our
//! answer; so before the caller shows it is really there, its SDP address is not sent a
//! stream (prompts at 8 kB/s for as long as we wait for the ACK), and the server cannot be
//! made to flood a third party.

use crate::media::dtmf::DtmfDetector;
use crate::media::g711::Codec;
use crate::media::inband::InbandDetector;
use crate::media::prompt::Prompt;
use crate::media::rtp::{self, LatchDecision, LatchScope, RtpStream};
use crate::media::sdp::{Direction, Negotiated};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Samples in one 20 ms G.711 packet.
pub const FRAME_SAMPLES: usize = 160;
/// Buffer size that fits any packet we send.
pub const MAX_PACKET: usize = rtp::HEADER_LEN + FRAME_SAMPLES + 16;

/// Something the call should react to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaEvent {
    /// A key press (RFC 4733), reported once.
    Digit(char),
    /// The prompt queue has finished playing.
    PlayDone,
}

/// Counters, for logs and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct MediaStats {
    pub packets_in: u64,
    pub(crate) packets_out: u64,
    pub malformed_in: u64,
    pub foreign_in: u64,
    pub digits: u64,
    /// Packet times missed because the call's task was late (sent as a timestamp gap).
    pub(crate) late_ticks: u64,
}

/// Per-call media state.
pub struct MediaSession {
    neg: Negotiated,
    stream: RtpStream,
    latch: rtp::Latch,
    dtmf: DtmfDetector,
    /// Keys in the caller's audio, for a caller without `telephone-event` (boxed: most callers
    /// have it, and this is ~450 bytes per call).
    inband: Option<Box<InbandDetector>>,
    /// The last key heard in the audio, and when.
    last_inband: Option<(char, Instant)>,
    /// A key came by SIP INFO: tones in the audio are not keys for the rest of the call.
    keys_by_info: bool,
    queue: VecDeque<Arc<Prompt>>,
    current: Option<(Arc<Prompt>, usize)>,
    last_rx: Instant,
    pub stats: MediaStats,
    silence: [u8; FRAME_SAMPLES],
    /// Set once a malformed or foreign packet was logged, so a flood logs once.
    pub warned: bool,
    /// How many times playback was stopped (barge-in): tells a "queue ran dry" noticed before
    /// a stop from one that belongs to what was queued after it.
    stops: u64,
    /// The far end has shown it is there (ACK, or RTP from an admitted source): until then we
    /// send nothing.
    confirmed: bool,
}

/// How long after a key heard in the audio an INFO with the same key is taken as the same
/// press (the gateway's INFO for the tone it also let through), not a second one.
pub(crate) const INFO_AFTER_TONE: Duration = Duration::from_millis(500);

impl MediaSession {
    /// A session sending to `remote` (the SDP's address) from the first tick, and taking
    /// media from that IP only (see [`MediaSession::latch_scope`]).
    pub fn new(now: Instant, neg: Negotiated, remote: SocketAddr) -> Self {
        MediaSession {
            neg,
            stream: RtpStream::new(),
            latch: rtp::Latch::new(remote, LatchScope::Sdp),
            dtmf: DtmfDetector::new(),
            inband: Self::inband_for(&neg),
            last_inband: None,
            keys_by_info: false,
            queue: VecDeque::new(),
            current: None,
            last_rx: now,
            stats: MediaStats::default(),
            stops: 0,
            silence: [neg.codec.silence_byte(); FRAME_SAMPLES],
            warned: false,
            confirmed: true,
        }
    }

    /// Take media from the sources `scope` admits: for a caller, `SdpOr(<where its INVITE
    /// came from>)`, so a phone behind NAT is heard and a third party is not.
    pub(crate) fn latch_scope(mut self, scope: LatchScope) -> Self {
        self.latch.set_scope(scope);
        self
    }

    /// Send nothing until [`MediaSession::confirm`] or the first valid RTP packet from an
    /// admitted source (for a call we answered: see the module's notes).
    pub(crate) fn until_confirmed(mut self) -> Self {
        self.confirmed = false;
        self
    }

    /// The far end confirmed the call (its ACK arrived): our stream may start.
    pub(crate) fn confirm(&mut self) {
        self.confirmed = true;
    }

    /// Whether our stream may flow (see [`MediaSession::until_confirmed`]).
    pub(crate) fn is_confirmed(&self) -> bool {
        self.confirmed
    }

    /// A key came by SIP INFO at `now`. A caller that signals keys that way has them heard
    /// from INFO only from now on: a gateway that sends INFO and leaves the tones in the audio
    /// would otherwise press every key twice (and a doubled 1 skips the 911 screening).
    /// Returns whether this INFO repeats the key just heard in the audio (within
    /// [`INFO_AFTER_TONE`]), in which case it is not a new press.
    pub(crate) fn on_info_key(&mut self, key: char, now: Instant) -> bool {
        self.keys_by_info = true;
        self.inband = None;
        self.last_inband
            .take()
            .is_some_and(|(k, at)| k == key && now.saturating_duration_since(at) <= INFO_AFTER_TONE)
    }

    /// An in-band key detector when the call has no RFC 4733 events to carry its keys.
    fn inband_for(neg: &Negotiated) -> Option<Box<InbandDetector>> {
        neg.telephone_event
            .is_none()
            .then(|| Box::new(InbandDetector::new()))
    }

    pub(crate) fn codec(&self) -> Codec {
        self.neg.codec
    }

    pub(crate) fn negotiated(&self) -> Negotiated {
        self.neg
    }

    /// Where our packets go.
    pub(crate) fn remote(&self) -> SocketAddr {
        self.latch.remote()
    }

    /// Latched to the address the SDP names, where it stays until a re-INVITE: see
    /// [`rtp::Latch`].
    pub(crate) fn is_settled(&self) -> bool {
        self.latch.is_settled()
    }

    /// When the last valid RTP packet arrived (or the session started).
    pub(crate) fn last_rx(&self) -> Instant {
        self.last_rx
    }

    /// A new offer/answer inside the call (re-INVITE: hold, unhold, new address or codec).
    pub(crate) fn renegotiate(&mut self, neg: Negotiated, remote: SocketAddr) {
        if neg.codec != self.neg.codec {
            self.silence = [neg.codec.silence_byte(); FRAME_SAMPLES];
        }
        if neg.telephone_event.is_some() != self.neg.telephone_event.is_some() && !self.keys_by_info
        {
            self.inband = Self::inband_for(&neg);
        }
        self.neg = neg;
        self.latch.resignal(remote);
        self.stream.start_talkspurt();
    }

    /// Queue prompts after whatever is playing.
    pub fn play<I: IntoIterator<Item = Arc<Prompt>>>(&mut self, prompts: I) {
        self.queue.extend(prompts);
    }

    /// Stop playing and forget the queue (barge-in).
    pub(crate) fn stop(&mut self) {
        self.stops += 1;
        self.queue.clear();
        if self.current.take().is_some() {
            self.stream.start_talkspurt();
        }
    }

    /// See [`MediaSession::stop`]; compare with the value when an event was noticed.
    pub(crate) fn stops(&self) -> u64 {
        self.stops
    }

    pub(crate) fn is_playing(&self) -> bool {
        self.current.is_some() || !self.queue.is_empty()
    }

    /// We may send unless the caller put us on hold.
    fn may_send(&self) -> bool {
        matches!(
            self.neg.direction,
            Direction::SendRecv | Direction::SendOnly
        )
    }

    /// A datagram arrived on the call's RTP port.
    pub fn on_rtp(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &[u8],
    ) -> Result<Option<MediaEvent>, rtp::RtpError> {
        let p = match rtp::parse(buf) {
            Ok(p) => p,
            Err(rtp::RtpError::Rtcp(_)) => return Ok(None),
            Err(e) => {
                self.stats.malformed_in += 1;
                return Err(e);
            }
        };
        match self.latch.on_packet(from) {
            LatchDecision::Foreign => {
                self.stats.foreign_in += 1;
                return Ok(None);
            }
            LatchDecision::Latched | LatchDecision::Accept => {}
        }
        // Media from where the signalling said: the caller is there, even if its ACK was lost.
        self.confirmed = true;
        self.stats.packets_in += 1;
        self.last_rx = now;
        if Some(p.payload_type) == self.neg.telephone_event {
            if let Ok(Some(d)) = self.dtmf.on_packet(now, p.timestamp, p.payload) {
                self.stats.digits += 1;
                return Ok(Some(MediaEvent::Digit(d)));
            }
        } else if let (Some(inband), true) =
            (&mut self.inband, p.payload_type == self.neg.payload_type)
        {
            let mut pcm = [0i16; 480];
            let n = p.payload.len().min(pcm.len());
            self.neg.codec.decode(&p.payload[..n], &mut pcm[..n]);
            if let Some(d) = inband.feed(&pcm[..n]) {
                self.stats.digits += 1;
                self.last_inband = Some((d, now));
                return Ok(Some(MediaEvent::Digit(d)));
            }
        }
        Ok(None)
    }

    /// One packet time passed. Writes the packet to send into `out` and returns its length
    /// (0 when nothing is sent), plus an event when the queue just ran dry.
    pub fn on_tick(&mut self, out: &mut [u8; MAX_PACKET]) -> (usize, Option<MediaEvent>) {
        if !self.confirmed {
            // Nothing sent and nothing played: the first prompt starts when the caller is
            // known to be there.
            return (0, None);
        }
        if !self.may_send() {
            self.stream.skip(FRAME_SAMPLES as u32);
            return (0, None);
        }
        if self.current.is_none() {
            if let Some(p) = self.queue.pop_front() {
                self.current = Some((p, 0));
                self.stream.start_talkspurt();
            }
        }
        let mut event = None;
        let pt = self.neg.payload_type;
        let samples = FRAME_SAMPLES as u32;
        let n = match &mut self.current {
            Some((prompt, i)) => {
                let data = prompt.encoded(self.neg.codec);
                let start = i.saturating_mul(FRAME_SAMPLES);
                // Whole frames go from the shared prompt straight into the packet.
                let n = match data.get(start..start.saturating_add(FRAME_SAMPLES)) {
                    Some(frame) => self.stream.write(pt, frame, samples, out),
                    None => {
                        // The final partial frame, padded with silence.
                        let mut frame = self.silence;
                        let rest = data.get(start..).unwrap_or_default();
                        frame[..rest.len()].copy_from_slice(rest);
                        self.stream.write(pt, &frame, samples, out)
                    }
                };
                *i += 1;
                if *i >= prompt.frames() {
                    self.current = None;
                    if self.queue.is_empty() {
                        event = Some(MediaEvent::PlayDone);
                    }
                }
                n
            }
            None => self.stream.write(pt, &self.silence, samples, out),
        };
        self.stats.packets_out += 1;
        (n, event)
    }

    /// Packet times were missed (the task was stalled): move our timestamp on instead of
    /// sending a burst of late packets.
    pub(crate) fn skip_ticks(&mut self, ticks: u32) {
        self.stats.late_ticks += ticks as u64;
        self.stream.skip(ticks * FRAME_SAMPLES as u32);
    }

    /// Packet times passed in which another stream had the caller's ear (a bridge's early
    /// media): move our timestamp on, so the next packet starts a talkspurt at the right time.
    pub(crate) fn pause_ticks(&mut self, ticks: u32) {
        self.stream.skip(ticks * FRAME_SAMPLES as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::dtmf::TelephoneEvent;

    fn neg() -> Negotiated {
        Negotiated {
            codec: Codec::Pcmu,
            payload_type: 0,
            telephone_event: Some(101),
            direction: Direction::SendRecv,
        }
    }

    fn tone(name: &str, ms: usize) -> Arc<Prompt> {
        let samples: Vec<i16> = (0..ms * 8)
            .map(|i| ((i as f32 * 0.785).sin() * 8000.0) as i16)
            .collect();
        Arc::new(Prompt::from_pcm(name, &samples, 8000, 1).unwrap())
    }

    /// Key `5` as tones (770 + 1336 Hz) for 100 ms, then 60 ms of silence: PCMU packets from
    /// sequence number `seq`.
    fn tone_key_packets(seq: u16) -> Vec<Vec<u8>> {
        let mut s = RtpStream::with_origin(9, seq, 0);
        (0..8usize)
            .map(|p| {
                let pcm = match p {
                    0..5 => crate::media::inband::tone('5', p * 160, 160, 6000.0).unwrap(),
                    _ => vec![0; 160],
                };
                let mut payload = [0u8; 160];
                Codec::Pcmu.encode(&pcm, &mut payload);
                let mut out = [0u8; 200];
                let n = s.write(0, &payload, 160, &mut out);
                out[..n].to_vec()
            })
            .collect()
    }

    #[test]
    fn tones_are_keys_without_telephone_event_until_the_caller_sends_keys_by_info() {
        let t0 = Instant::now();
        let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let plain = Negotiated {
            telephone_event: None,
            ..neg()
        };
        let keys = |m: &mut MediaSession, seq: u16, at: Instant| -> Vec<char> {
            tone_key_packets(seq)
                .iter()
                .filter_map(|p| match m.on_rtp(at, from, p) {
                    Ok(Some(MediaEvent::Digit(d))) => Some(d),
                    _ => None,
                })
                .collect()
        };
        // With telephone-event negotiated, tones are audio.
        let mut m = MediaSession::new(t0, neg(), from);
        assert!(keys(&mut m, 1, t0).is_empty());
        // Without, they are keys.
        let mut m = MediaSession::new(t0, plain, from);
        assert_eq!(keys(&mut m, 1, t0), ['5']);
        // The gateway's INFO for the same press is not a second key, and from then on keys
        // come by INFO only.
        assert!(m.on_info_key('5', t0 + Duration::from_millis(200)));
        assert!(keys(&mut m, 20, t0).is_empty());
        assert!(!m.on_info_key('5', t0 + Duration::from_millis(400)));
        // An INFO for another key, or long after, is a press of its own.
        let mut m = MediaSession::new(t0, plain, from);
        assert_eq!(keys(&mut m, 1, t0), ['5']);
        assert!(!m.on_info_key('6', t0 + Duration::from_millis(100)));
        let mut m = MediaSession::new(t0, plain, from);
        assert_eq!(keys(&mut m, 1, t0), ['5']);
        assert!(!m.on_info_key('5', t0 + Duration::from_secs(2)));
    }

    fn dtmf_packet(ts: u32, seq: u16, event: u8, end: bool) -> Vec<u8> {
        let mut s = RtpStream::with_origin(7, seq, ts);
        let ev = TelephoneEvent {
            event,
            end,
            volume: 10,
            duration: 800,
        };
        let mut out = [0u8; 64];
        let n = s.write_at(101, ts, false, &ev.write(), &mut out);
        out[..n].to_vec()
    }

    #[test]
    fn plays_queue_then_silence_and_reports_done_once() {
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, neg(), "127.0.0.1:4000".parse().unwrap());
        m.play([tone("a", 40), tone("b", 20)]);
        let mut out = [0u8; MAX_PACKET];
        let mut events = vec![];
        let mut markers = vec![];
        for _ in 0..6 {
            let (n, ev) = m.on_tick(&mut out);
            assert_eq!(n, 172);
            let p = rtp::parse(&out[..n]).unwrap();
            markers.push(p.marker);
            events.push(ev);
        }
        assert_eq!(
            events,
            vec![None, None, Some(MediaEvent::PlayDone), None, None, None]
        );
        // marker at the start of each talk spurt (prompt a, prompt b), not on silence
        assert_eq!(markers, vec![true, false, true, false, false, false]);
        assert!(!m.is_playing());
    }

    #[test]
    fn prompt_frames_are_sent_as_encoded_and_the_last_partial_one_is_padded() {
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, neg(), "127.0.0.1:4000".parse().unwrap());
        let p = tone("odd", 25); // 200 samples: one whole frame and 40 samples
        m.play([p.clone()]);
        let mut out = [0u8; MAX_PACKET];
        let (n, ev) = m.on_tick(&mut out);
        assert_eq!((n, ev), (172, None));
        assert_eq!(
            rtp::parse(&out[..n]).unwrap().payload,
            &p.encoded(Codec::Pcmu)[..160]
        );
        let (n, ev) = m.on_tick(&mut out);
        assert_eq!((n, ev), (172, Some(MediaEvent::PlayDone)));
        let payload = rtp::parse(&out[..n]).unwrap().payload;
        assert_eq!(&payload[..40], &p.encoded(Codec::Pcmu)[160..]);
        assert!(payload[40..]
            .iter()
            .all(|b| *b == Codec::Pcmu.silence_byte()));
    }

    #[test]
    fn digits_are_reported_once_and_barge_in_stops_playback() {
        let t0 = Instant::now();
        let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mut m = MediaSession::new(t0, neg(), from);
        m.play([tone("long", 2000)]);
        let mut out = [0u8; MAX_PACKET];
        m.on_tick(&mut out);
        assert!(m.is_playing());
        let mut digits = vec![];
        for (i, end) in [false, false, true, true, true].iter().enumerate() {
            if let Ok(Some(MediaEvent::Digit(d))) =
                m.on_rtp(t0, from, &dtmf_packet(500, i as u16, 5, *end))
            {
                digits.push(d);
                m.stop();
            }
        }
        assert_eq!(digits, vec!['5']);
        assert!(!m.is_playing());
        // garbage never panics and is counted
        assert!(m.on_rtp(t0, from, b"hello").is_err());
        assert_eq!(m.stats.malformed_in, 1);
    }

    #[test]
    fn hold_sends_nothing_and_unhold_resumes() {
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, neg(), "127.0.0.1:4000".parse().unwrap());
        let mut out = [0u8; MAX_PACKET];
        let held = Negotiated {
            direction: Direction::RecvOnly,
            ..neg()
        };
        m.renegotiate(held, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(m.on_tick(&mut out).0, 0);
        m.renegotiate(neg(), "127.0.0.1:4000".parse().unwrap());
        assert_eq!(m.on_tick(&mut out).0, 172);
    }

    /// Answered but not confirmed: nothing is sent and the prompt waits, whoever else sends
    /// to the port. The ACK starts the stream; so does the caller's media when its ACK was
    /// lost.
    #[test]
    fn nothing_is_sent_until_the_ack_or_the_callers_own_media() {
        let t0 = Instant::now();
        let sdp: SocketAddr = "192.0.2.5:4000".parse().unwrap();
        let signalling: std::net::IpAddr = "198.51.100.7".parse().unwrap();
        let started = || {
            let mut m = MediaSession::new(t0, neg(), sdp)
                .latch_scope(LatchScope::SdpOr(signalling))
                .until_confirmed();
            m.play([tone("hello", 40)]);
            m
        };
        let mut out = [0u8; MAX_PACKET];
        let mut m = started();
        for _ in 0..50 {
            assert_eq!(m.on_tick(&mut out), (0, None));
        }
        m.confirm();
        let (n, _) = m.on_tick(&mut out);
        assert_eq!(n, 172);
        assert!(
            rtp::parse(&out[..n]).unwrap().marker,
            "the prompt starts from its beginning"
        );

        // A stranger's packets neither confirm nor latch; the caller's (from behind its NAT,
        // at the signalling source's address) do.
        let mut m = started();
        let mut s = RtpStream::with_origin(1, 1, 0);
        let mut pkt = [0u8; 200];
        let len = s.write(0, &[0xff; 160], 160, &mut pkt);
        let stranger: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        assert_eq!(m.on_rtp(t0, stranger, &pkt[..len]), Ok(None));
        assert_eq!(m.on_tick(&mut out).0, 0);
        assert_eq!(m.remote(), sdp);
        let nat = SocketAddr::new(signalling, 31000);
        assert_eq!(m.on_rtp(t0, nat, &pkt[..len]), Ok(None));
        assert_eq!(m.remote(), nat);
        assert_eq!(m.on_tick(&mut out).0, 172);
    }
}
