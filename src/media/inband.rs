//! DTMF keys heard in the caller's audio (in-band tones), for callers whose offer has no
//! RFC 4733 `telephone-event`.
//!
//! Most phones and trunks send keys as RFC 4733 events ([`crate::media::dtmf`]). Some do not:
//! older PSTN gateways, PBXs set to in-band DTMF, a carrier leg that transcodes. To such a
//! caller the menu was deaf: every key, the 911 key included, went unheard, and the caller
//! sat in the menu until its timeout. When the answer has no `telephone-event`
//! ([`crate::media::session::MediaSession`]), the caller's audio is decoded and run through
//! this detector instead.
//!
//! The method is the usual one (Goertzel filters at the eight DTMF frequencies, as in ITU-T
//! Q.23/Q.24 receivers): the audio is cut into blocks of [`BLOCK`] samples (12.75 ms at
//! 8 kHz), and a block holds a key when
//! - one row and one column frequency stand out, each above [`MIN_TONE`],
//! - the two are within [`TWIST`] (8 dB) of each other,
//! - every other row (and column) is at least [`PEAK`] (8 dB) below the strongest one, and
//! - the two tones carry at least [`IN_TONES`] of the block's energy (speech and music spread
//!   theirs over many frequencies; a key is two pure tones).
//!
//! A key is reported when two blocks in a row hold it (at least ~26 ms of tone: Q.24 asks
//! that 40 ms tones be heard and 23 ms ones not), and once only: it is released after two
//! blocks in a row without it, so one noisy block in the middle of a long press does not
//! make a second key.
//!
//! Sans-IO: samples in, keys out; no clock, no sockets.

/// Samples per analysis block: 102 at 8 kHz (12.75 ms), short enough for two blocks to fit in
/// a 40 ms key and long enough to tell 697 Hz from 770 Hz.
pub(crate) const BLOCK: usize = 102;
/// Row (low group) and column (high group) frequencies, Hz.
const ROWS: [f32; 4] = [697.0, 770.0, 852.0, 941.0];
const COLS: [f32; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
const KEYS: [[char; 4]; 4] = [
    ['1', '2', '3', 'A'],
    ['4', '5', '6', 'B'],
    ['7', '8', '9', 'C'],
    ['*', '0', '#', 'D'],
];
/// The quietest tone (amplitude, of 32767) a key may have: about −44 dBFS, well under what a
/// phone sends (−6 to −10 dBm0 per tone) and what a line leaves of it.
pub(crate) const MIN_TONE: f32 = 200.0;
/// Largest power ratio between the two tones of a key (8 dB).
pub(crate) const TWIST: f32 = 6.31;
/// How far (power ratio, 8 dB) every other frequency of a group must be under the strongest.
pub(crate) const PEAK: f32 = 6.31;
/// Share of the block's energy the two tones must carry.
pub(crate) const IN_TONES: f32 = 0.7;

/// One Goertzel filter: `2 cos(2π f / 8000)`.
fn coefficient(f: f32) -> f32 {
    2.0 * (std::f32::consts::TAU * f / 8000.0).cos()
}

/// Power at the filter's frequency over `x`, scaled so that a sine of amplitude `a` gives
/// about `a²` whatever the block length.
fn power(coeff: f32, x: &[f32]) -> f32 {
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for &v in x {
        let s0 = v + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let raw = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    let half = x.len() as f32 / 2.0;
    raw / (half * half)
}

/// The strongest of four powers, if every other one is at least [`PEAK`] under it.
fn standout(p: &[f32; 4]) -> Option<(usize, f32)> {
    let (best, &top) = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
    let clear = p
        .iter()
        .enumerate()
        .all(|(i, &v)| i == best || v * PEAK < top);
    clear.then_some((best, top))
}

/// The key one block holds, if any.
fn block_key(x: &[f32]) -> Option<char> {
    // Mean power of the block; a sine of amplitude `a` has a²/2.
    let energy = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    if energy < MIN_TONE * MIN_TONE / 2.0 {
        return None;
    }
    let rows = ROWS.map(|f| power(coefficient(f), x));
    let cols = COLS.map(|f| power(coefficient(f), x));
    let (r, row) = standout(&rows)?;
    let (c, col) = standout(&cols)?;
    let min = MIN_TONE * MIN_TONE;
    if row < min || col < min || row > col * TWIST || col > row * TWIST {
        return None;
    }
    // Each tone's mean power is its power / 2.
    if (row + col) / 2.0 < IN_TONES * energy {
        return None;
    }
    Some(KEYS[r][c])
}

/// `len` samples of key `key`'s two tones at 8 kHz, each of amplitude `amplitude` (of 32767),
/// from sample `start` of the key (so a press can be cut into packets), or `None` for a
/// character that is not a key. What a phone sends for an in-band key; the tests use it.
pub fn tone(key: char, start: usize, len: usize, amplitude: f32) -> Option<Vec<i16>> {
    let (r, c) = (0..4)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .find(|&(r, c)| KEYS[r][c] == key.to_ascii_uppercase())?;
    let tau = std::f32::consts::TAU;
    Some(
        (start..start + len)
            .map(|i| {
                let t = i as f32 / 8000.0;
                let v = amplitude * ((tau * ROWS[r] * t).sin() + (tau * COLS[c] * t).sin());
                v.clamp(-32768.0, 32767.0) as i16
            })
            .collect(),
    )
}

/// Turns one caller's audio into key presses, each reported once.
#[derive(Debug, Clone)]
pub(crate) struct InbandDetector {
    block: [f32; BLOCK],
    filled: usize,
    /// What the last block held.
    last: Option<char>,
    /// The key being held down (already reported).
    down: Option<char>,
}

impl Default for InbandDetector {
    fn default() -> Self {
        Self::new()
    }
}

impl InbandDetector {
    pub(crate) fn new() -> Self {
        InbandDetector {
            block: [0.0; BLOCK],
            filled: 0,
            last: None,
            down: None,
        }
    }

    /// Feed decoded audio (8 kHz, 16-bit); the key whose press completed in it, if any. (Two
    /// keys in one call would need a 20 ms packet to hold the end of one and a whole second:
    /// not possible with [`BLOCK`]-sample blocks and the two-block rule.)
    pub(crate) fn feed(&mut self, pcm: &[i16]) -> Option<char> {
        let mut pressed = None;
        for &s in pcm {
            self.block[self.filled] = f32::from(s);
            self.filled += 1;
            if self.filled == BLOCK {
                self.filled = 0;
                let hit = block_key(&self.block);
                if hit == self.last {
                    match hit {
                        Some(k) if self.down != Some(k) => {
                            self.down = Some(k);
                            pressed = pressed.or(Some(k));
                        }
                        None => self.down = None,
                        _ => {}
                    }
                }
                self.last = hit;
            }
        }
        pressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::g711::Codec;

    /// `ms` of key `k` at `amp` per tone (row amplitude × `twist`), starting at sample `t0`.
    fn tone(k: char, ms: usize, amp: f32, twist: f32, t0: usize) -> Vec<i16> {
        if twist == 1.0 {
            return super::tone(k, t0, ms * 8, amp).unwrap();
        }
        let (r, c) = (0..4)
            .flat_map(|r| (0..4).map(move |c| (r, c)))
            .find(|&(r, c)| KEYS[r][c] == k)
            .unwrap();
        (t0..t0 + ms * 8)
            .map(|i| {
                let t = i as f32 / 8000.0;
                let v = amp * twist * (std::f32::consts::TAU * ROWS[r] * t).sin()
                    + amp * (std::f32::consts::TAU * COLS[c] * t).sin();
                v as i16
            })
            .collect()
    }

    fn silence(ms: usize) -> Vec<i16> {
        vec![0; ms * 8]
    }

    /// Through G.711 and in 20 ms packets, as the caller's audio reaches the detector.
    fn keys_heard(pcm: &[i16], codec: Codec) -> String {
        let mut d = InbandDetector::new();
        let mut out = String::new();
        for frame in pcm.chunks(160) {
            let mut wire = vec![0u8; frame.len()];
            codec.encode(frame, &mut wire);
            let mut back = vec![0i16; frame.len()];
            codec.decode(&wire, &mut back);
            if let Some(k) = d.feed(&back) {
                out.push(k);
            }
        }
        out
    }

    #[test]
    fn every_key_is_heard_once_through_either_codec() {
        for codec in [Codec::Pcmu, Codec::Pcma] {
            let mut pcm = silence(60);
            let keys = "123A456B789C*0#D";
            for k in keys.chars() {
                pcm.extend(tone(k, 80, 6000.0, 1.0, pcm.len()));
                pcm.extend(silence(60));
            }
            assert_eq!(keys_heard(&pcm, codec), keys, "{codec:?}");
        }
    }

    #[test]
    fn the_same_key_twice_is_two_presses_and_a_long_press_is_one() {
        let mut pcm = tone('5', 1500, 4000.0, 1.0, 0);
        pcm.extend(silence(50));
        pcm.extend(tone('5', 60, 4000.0, 1.0, pcm.len()));
        pcm.extend(silence(50));
        assert_eq!(keys_heard(&pcm, Codec::Pcmu), "55");
    }

    #[test]
    fn short_quiet_or_lopsided_tones_and_single_tones_are_not_keys() {
        // 40 ms is heard; 20 ms (under Q.24's 23 ms) is not.
        let mut pcm = tone('7', 40, 5000.0, 1.0, 0);
        pcm.extend(silence(100));
        assert_eq!(keys_heard(&pcm, Codec::Pcmu), "7");
        let mut pcm = tone('7', 20, 5000.0, 1.0, 0);
        pcm.extend(silence(100));
        assert_eq!(keys_heard(&pcm, Codec::Pcmu), "");
        // Too quiet (about −50 dBFS per tone).
        assert_eq!(keys_heard(&tone('1', 200, 100.0, 1.0, 0), Codec::Pcmu), "");
        // 12 dB of twist.
        assert_eq!(keys_heard(&tone('1', 200, 1000.0, 4.0, 0), Codec::Pcmu), "");
        // 6 dB of twist is within a real line's.
        assert_eq!(
            keys_heard(&tone('1', 200, 2000.0, 2.0, 0), Codec::Pcmu),
            "1"
        );
        // One tone alone (a dial tone's 440 Hz, or a 697 Hz whistle).
        let whistle: Vec<i16> = (0..1600)
            .map(|i| (8000.0 * (std::f32::consts::TAU * 697.0 * i as f32 / 8000.0).sin()) as i16)
            .collect();
        assert_eq!(keys_heard(&whistle, Codec::Pcmu), "");
    }

    #[test]
    fn a_key_under_loud_broadband_noise_is_not_taken_and_clean_audio_after_is() {
        // White noise as loud as the tones: less than the required share is in the tones.
        let mut seed = 1u32;
        let noisy: Vec<i16> = tone('9', 200, 3000.0, 1.0, 0)
            .into_iter()
            .map(|s| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let n = ((seed >> 16) as i32 % 12000) - 6000;
                (s as i32 + n).clamp(-32768, 32767) as i16
            })
            .collect();
        assert_eq!(keys_heard(&noisy, Codec::Pcmu), "");
        let mut pcm = noisy;
        pcm.extend(tone('9', 100, 3000.0, 1.0, pcm.len()));
        assert_eq!(keys_heard(&pcm, Codec::Pcmu), "9");
    }
}

#[cfg(test)]
mod talk_off {
    use super::*;
    use crate::media::g711::Codec;

    /// Talk-off: the shipped prompts (speech, in two languages, and music-free tones such as
    /// the beep) are fed through the detector as a caller's audio would be (PCMU, 20 ms); none
    /// may read as a key. A PSTN line echoes our prompts back at the caller's end, so this is
    /// what the detector hears on every such call.
    #[test]
    fn none_of_the_shipped_prompts_reads_as_a_key() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
        let mut files = 0;
        let mut seconds = 0.0;
        for lang in ["en", "es"] {
            for entry in std::fs::read_dir(dir.join(lang)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "wav") {
                    continue;
                }
                let mut r = hound::WavReader::open(&path).unwrap();
                assert_eq!(r.spec().sample_rate, 8000, "{}", path.display());
                let pcm: Vec<i16> = r.samples::<i16>().map(Result::unwrap).collect();
                let mut d = InbandDetector::new();
                let mut keys = String::new();
                for frame in pcm.chunks(160) {
                    let mut wire = vec![0u8; frame.len()];
                    Codec::Pcmu.encode(frame, &mut wire);
                    let mut back = vec![0i16; frame.len()];
                    Codec::Pcmu.decode(&wire, &mut back);
                    keys.extend(d.feed(&back));
                }
                assert_eq!(keys, "", "{} reads as keys", path.display());
                files += 1;
                seconds += pcm.len() as f64 / 8000.0;
            }
        }
        assert!(files > 40 && seconds > 200.0, "{files} files, {seconds} s");
    }
}
