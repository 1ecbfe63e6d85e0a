//! Mixing for a monitored bridge (listen, whisper, barge), sans-IO.
//!
//! A bridge caller ⇄ operator that a supervisor monitors has three parties. What each hears
//! depends on the [`MonitorMode`]:
//!
//! | mode | the caller hears | the operator hears | the supervisor hears |
//! | --- | --- | --- | --- |
//! | listen | the operator | the caller | both |
//! | whisper | the operator | the caller and the supervisor | both |
//! | barge | the operator and the supervisor | the caller and the supervisor | both |
//!
//! A party that hears only one other party gets that party's packets relayed as they arrive
//! (the bridge's own path, [`crate::media::bridge`]); a party that hears two gets one packet
//! per packet time from the [`Mixer`]: each talker's G.711 is decoded into a short queue of
//! linear samples ([`Fifo`], at most [`FIFO_FRAMES`] packet times, the oldest dropped beyond
//! that so the delay stays bounded), one frame of each is taken at every tick of the media
//! clock, summed with saturation, and encoded for the listener's codec. No allocation per
//! packet: the queues and frames are fixed arrays.
//!
//! This module touches no socket and reads no clock; the media clock drives it.

use crate::media::g711::Codec;
use serde::{Deserialize, Serialize};

/// Samples in one packet time (20 ms at 8 kHz).
pub const FRAME: usize = 160;
/// Packet times a talker's queue holds at most (80 ms): more means the talker's clock runs
/// ahead of ours or a burst arrived, and the oldest samples go.
pub const FIFO_FRAMES: usize = 4;

/// How a supervisor joins an operator's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MonitorMode {
    /// The supervisor hears both sides; nobody hears the supervisor.
    Listen,
    /// The supervisor hears both sides; the operator hears the supervisor, the caller does not.
    Whisper,
    /// Everyone hears the other two.
    Barge,
}

impl MonitorMode {
    /// Its name in the API, the audit and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MonitorMode::Listen => "listen",
            MonitorMode::Whisper => "whisper",
            MonitorMode::Barge => "barge",
        }
    }

    /// The mode a key on the supervisor's phone switches to (4 listen, 5 whisper, 6 barge, as
    /// Asterisk's ChanSpy), or `None`.
    pub fn from_key(key: char) -> Option<MonitorMode> {
        match key {
            '4' => Some(MonitorMode::Listen),
            '5' => Some(MonitorMode::Whisper),
            '6' => Some(MonitorMode::Barge),
            _ => None,
        }
    }

    pub(crate) fn to_u8(self) -> u8 {
        match self {
            MonitorMode::Listen => 0,
            MonitorMode::Whisper => 1,
            MonitorMode::Barge => 2,
        }
    }

    pub(crate) fn from_u8(v: u8) -> MonitorMode {
        match v {
            1 => MonitorMode::Whisper,
            2 => MonitorMode::Barge,
            _ => MonitorMode::Listen,
        }
    }

    /// Whether `listener` hears `talker` in this mode.
    pub fn hears(self, listener: Party, talker: Party) -> bool {
        use Party::*;
        match (listener, talker) {
            (a, b) if a == b => false,
            (Supervisor, _) => true,
            (Operator, Caller) | (Caller, Operator) => true,
            (Operator, Supervisor) => self != MonitorMode::Listen,
            (Caller, Supervisor) => self == MonitorMode::Barge,
            _ => false,
        }
    }

    /// Whether `listener` hears two parties, so its audio comes from the [`Mixer`] rather
    /// than the bridge's relay.
    pub fn mixed_for(self, listener: Party) -> bool {
        Party::ALL
            .iter()
            .filter(|t| self.hears(listener, **t))
            .count()
            > 1
    }
}

/// One party of a monitored bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    Caller,
    Operator,
    Supervisor,
}

impl Party {
    pub const ALL: [Party; 3] = [Party::Caller, Party::Operator, Party::Supervisor];

    fn index(self) -> usize {
        match self {
            Party::Caller => 0,
            Party::Operator => 1,
            Party::Supervisor => 2,
        }
    }
}

/// A bounded queue of linear samples from one talker.
#[derive(Debug, Clone)]
pub struct Fifo {
    buf: [i16; FRAME * FIFO_FRAMES],
    start: usize,
    len: usize,
}

impl Default for Fifo {
    fn default() -> Self {
        Fifo {
            buf: [0; FRAME * FIFO_FRAMES],
            start: 0,
            len: 0,
        }
    }
}

impl Fifo {
    const CAP: usize = FRAME * FIFO_FRAMES;

    /// Queue `samples`; beyond the capacity the oldest are dropped.
    pub fn push(&mut self, samples: &[i16]) {
        let samples = &samples[samples.len().saturating_sub(Self::CAP)..];
        let over = (self.len + samples.len()).saturating_sub(Self::CAP);
        self.start = (self.start + over) % Self::CAP;
        self.len -= over;
        for &s in samples {
            self.buf[(self.start + self.len) % Self::CAP] = s;
            self.len += 1;
        }
    }

    /// Take one frame into `out`, silence where the queue ran short; whether anything was
    /// there.
    pub fn pop_frame(&mut self, out: &mut [i16; FRAME]) -> bool {
        let n = self.len.min(FRAME);
        for (i, o) in out.iter_mut().enumerate() {
            *o = if i < n {
                self.buf[(self.start + i) % Self::CAP]
            } else {
                0
            };
        }
        self.start = (self.start + n) % Self::CAP;
        self.len -= n;
        n > 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Add `b` into `a`, sample by sample, clipping at the i16 range.
pub fn mix_into(a: &mut [i16], b: &[i16]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.saturating_add(*y);
    }
}

/// The three talkers' queues and the frame each contributes at the current packet time.
#[derive(Debug, Clone)]
pub struct Mixer {
    fifos: [Fifo; 3],
    frames: [[i16; FRAME]; 3],
}

impl Default for Mixer {
    fn default() -> Self {
        Mixer {
            fifos: Default::default(),
            frames: [[0; FRAME]; 3],
        }
    }
}

impl Mixer {
    /// Queue a G.711 payload `talker` sent in `codec`.
    pub fn push_g711(&mut self, talker: Party, codec: Codec, payload: &[u8]) {
        let mut pcm = [0i16; FRAME];
        for chunk in payload.chunks(FRAME) {
            codec.decode(chunk, &mut pcm[..chunk.len()]);
            self.fifos[talker.index()].push(&pcm[..chunk.len()]);
        }
    }

    /// Queue linear samples from `talker`.
    pub fn push(&mut self, talker: Party, pcm: &[i16]) {
        self.fifos[talker.index()].push(pcm);
    }

    /// One packet time: take the next frame of every talker (silence for one with nothing
    /// queued).
    pub fn tick(&mut self) {
        for (f, frame) in self.fifos.iter_mut().zip(self.frames.iter_mut()) {
            f.pop_frame(frame);
        }
    }

    /// What `listener` hears in `mode` at this packet time, into `out`.
    pub fn mix_for(&self, mode: MonitorMode, listener: Party, out: &mut [i16; FRAME]) {
        out.fill(0);
        for talker in Party::ALL {
            if mode.hears(listener, talker) {
                mix_into(out, &self.frames[talker.index()]);
            }
        }
    }

    /// [`Mixer::mix_for`], encoded in `codec` into `out`.
    pub fn encode_for(
        &self,
        mode: MonitorMode,
        listener: Party,
        codec: Codec,
        out: &mut [u8; FRAME],
    ) {
        let mut pcm = [0i16; FRAME];
        self.mix_for(mode, listener, &mut pcm);
        codec.encode(&pcm, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Party::*;

    #[test]
    fn who_hears_whom_in_each_mode() {
        use MonitorMode::*;
        // (mode, listener) -> (caller, operator, supervisor) heard.
        let table = [
            (Listen, Caller, [false, true, false]),
            (Listen, Operator, [true, false, false]),
            (Listen, Supervisor, [true, true, false]),
            (Whisper, Caller, [false, true, false]),
            (Whisper, Operator, [true, false, true]),
            (Whisper, Supervisor, [true, true, false]),
            (Barge, Caller, [false, true, true]),
            (Barge, Operator, [true, false, true]),
            (Barge, Supervisor, [true, true, false]),
        ];
        for (mode, listener, heard) in table {
            let got = Party::ALL.map(|t| mode.hears(listener, t));
            assert_eq!(got, heard, "{mode:?} {listener:?}");
            assert_eq!(
                mode.mixed_for(listener),
                heard.iter().filter(|h| **h).count() > 1
            );
        }
        // The caller never hears the supervisor but in barge.
        assert!(!Listen.mixed_for(Caller) && !Whisper.mixed_for(Caller));
        assert!(!Listen.mixed_for(Operator) && Whisper.mixed_for(Operator));
    }

    #[test]
    fn keys_switch_modes_as_chanspy() {
        assert_eq!(MonitorMode::from_key('4'), Some(MonitorMode::Listen));
        assert_eq!(MonitorMode::from_key('5'), Some(MonitorMode::Whisper));
        assert_eq!(MonitorMode::from_key('6'), Some(MonitorMode::Barge));
        assert_eq!(MonitorMode::from_key('1'), None);
        for m in [
            MonitorMode::Listen,
            MonitorMode::Whisper,
            MonitorMode::Barge,
        ] {
            assert_eq!(MonitorMode::from_u8(m.to_u8()), m);
        }
    }

    #[test]
    fn known_samples_are_summed_with_saturation() {
        let mut m = Mixer::default();
        m.push(Caller, &[1000; FRAME]);
        m.push(Operator, &[-300; FRAME]);
        m.push(Supervisor, &[32000; FRAME]);
        m.tick();
        let mut out = [0i16; FRAME];
        m.mix_for(MonitorMode::Listen, Supervisor, &mut out);
        assert_eq!(out, [700; FRAME]);
        m.mix_for(MonitorMode::Listen, Operator, &mut out);
        assert_eq!(out, [1000; FRAME]);
        m.mix_for(MonitorMode::Whisper, Operator, &mut out);
        assert_eq!(out, [i16::MAX; FRAME], "1000 + 32000 clips");
        m.mix_for(MonitorMode::Barge, Caller, &mut out);
        assert_eq!(out, [31700; FRAME]);

        let mut a = [i16::MIN + 5, -10, 10, i16::MAX - 5];
        mix_into(&mut a, &[-100, -20, 20, 100]);
        assert_eq!(a, [i16::MIN, -30, 30, i16::MAX]);
    }

    #[test]
    fn g711_is_decoded_and_a_silent_talker_adds_nothing() {
        let mut m = Mixer::default();
        let pcm: Vec<i16> = (0..FRAME as i16).map(|i| i * 50).collect();
        let mut ulaw = [0u8; FRAME];
        Codec::Pcmu.encode(&pcm, &mut ulaw);
        m.push_g711(Caller, Codec::Pcmu, &ulaw);
        m.tick();
        let mut out = [0i16; FRAME];
        m.mix_for(MonitorMode::Barge, Supervisor, &mut out);
        let mut expect = [0i16; FRAME];
        Codec::Pcmu.decode(&ulaw, &mut expect);
        assert_eq!(out, expect);
        // Encoded for an A-law supervisor.
        let mut alaw = [0u8; FRAME];
        m.encode_for(MonitorMode::Barge, Supervisor, Codec::Pcma, &mut alaw);
        let mut back = [0i16; FRAME];
        Codec::Pcma.decode(&alaw, &mut back);
        for (a, b) in back.iter().zip(expect.iter()) {
            assert!((i32::from(*a) - i32::from(*b)).abs() <= 256, "{a} vs {b}");
        }
        // Next packet time: nothing queued, silence.
        m.tick();
        m.mix_for(MonitorMode::Barge, Supervisor, &mut out);
        assert_eq!(out, [0; FRAME]);
    }

    #[test]
    fn a_queue_keeps_order_pads_short_frames_and_drops_the_oldest_when_full() {
        let mut f = Fifo::default();
        let mut out = [0i16; FRAME];
        // Half a frame: the rest is silence.
        f.push(&[7; FRAME / 2]);
        assert!(f.pop_frame(&mut out));
        assert_eq!(&out[..FRAME / 2], &[7; FRAME / 2]);
        assert_eq!(&out[FRAME / 2..], &[0; FRAME / 2]);
        assert!(!f.pop_frame(&mut out));
        // Six frames into a queue of four: the first two go.
        for k in 0..6i16 {
            f.push(&[k; FRAME]);
        }
        assert_eq!(f.len(), FRAME * FIFO_FRAMES);
        for k in 2..6i16 {
            assert!(f.pop_frame(&mut out));
            assert_eq!(out, [k; FRAME]);
        }
        assert!(f.is_empty());
        // Across the wrap of the ring, in order.
        let ramp: Vec<i16> = (0..(FRAME * 3) as i16).collect();
        f.push(&ramp[..FRAME + 10]);
        f.pop_frame(&mut out);
        f.push(&ramp[FRAME + 10..]);
        for k in 1..3usize {
            f.pop_frame(&mut out);
            assert_eq!(&out[..], &ramp[k * FRAME..(k + 1) * FRAME]);
        }
    }
}
