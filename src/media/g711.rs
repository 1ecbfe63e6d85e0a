//! G.711 µ-law (PCMU) and A-law (PCMA) companding, per ITU-T G.711.
//!
//! Owns: the sample-level conversion between 16-bit linear PCM and the two
//! 8-bit G.711 laws, the static RTP/AVP payload types and SDP encoding names
//! of the two codecs, and PCMU<->PCMA transcoding for bridged calls.
//!
//! Must not touch: RTP packetisation, timing, jitter buffers, SDP
//! negotiation or any I/O. Everything here is pure, allocation-free and
//! `const`-table driven, so it can be called from any task on every frame.
//!
//! The algorithms are the classic reference ones (Sun / ITU-T G.191 style):
//! encoding uses a bias + segment search via `leading_zeros`, decoding and
//! transcoding use 256-entry tables computed at compile time. Decoding a code
//! and re-encoding the result gives back the same code for every one of the
//! 256 codes, except µ-law "negative zero" (0x7F), which decodes to 0 and
//! re-encodes as 0xFF.

/// One of the two G.711 laws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// µ-law, RTP/AVP static payload type 0.
    Pcmu,
    /// A-law, RTP/AVP static payload type 8.
    Pcma,
}

impl Codec {
    /// Static RTP/AVP payload type (RFC 3551): 0 for PCMU, 8 for PCMA.
    pub fn payload_type(self) -> u8 {
        match self {
            Codec::Pcmu => 0,
            Codec::Pcma => 8,
        }
    }

    /// SDP `a=rtpmap` encoding name: "PCMU" or "PCMA".
    pub(crate) fn encoding_name(self) -> &'static str {
        match self {
            Codec::Pcmu => "PCMU",
            Codec::Pcma => "PCMA",
        }
    }

    /// Parses an SDP encoding name, case-insensitively ("pcmu", "PCMA", ...).
    pub(crate) fn from_encoding_name(name: &str) -> Option<Codec> {
        let name = name.trim();
        if name.eq_ignore_ascii_case("PCMU") {
            Some(Codec::Pcmu)
        } else if name.eq_ignore_ascii_case("PCMA") {
            Some(Codec::Pcma)
        } else {
            None
        }
    }

    /// Encodes linear samples into `out`, one byte per sample.
    ///
    /// `out.len()` should equal `pcm.len()`; if they differ, only the first
    /// `min(pcm.len(), out.len())` samples are converted (never panics).
    pub fn encode(self, pcm: &[i16], out: &mut [u8]) {
        match self {
            Codec::Pcmu => {
                for (o, &s) in out.iter_mut().zip(pcm) {
                    *o = ulaw_encode(s);
                }
            }
            Codec::Pcma => {
                for (o, &s) in out.iter_mut().zip(pcm) {
                    *o = alaw_encode(s);
                }
            }
        }
    }

    /// Decodes G.711 bytes into linear samples in `out`.
    ///
    /// `out.len()` should equal `enc.len()`; if they differ, only the first
    /// `min(enc.len(), out.len())` bytes are converted (never panics).
    pub fn decode(self, enc: &[u8], out: &mut [i16]) {
        let table = match self {
            Codec::Pcmu => &ULAW_TO_LINEAR,
            Codec::Pcma => &ALAW_TO_LINEAR,
        };
        for (o, &b) in out.iter_mut().zip(enc) {
            *o = table[usize::from(b)];
        }
    }

    /// The code of linear 0: 0xFF for µ-law, 0xD5 for A-law.
    pub fn silence_byte(self) -> u8 {
        match self {
            Codec::Pcmu => ULAW_SILENCE,
            Codec::Pcma => ALAW_SILENCE,
        }
    }

    /// Transcode one encoded frame to the other law in place-free fashion (for bridging PCMU<->PCMA)
    ///
    /// Equivalent to decoding with `from` and encoding with `to`, via a
    /// 256-entry table. When `from == to` the bytes are copied unchanged.
    /// Converts `min(input.len(), out.len())` bytes (never panics).
    pub fn transcode(from: Codec, to: Codec, input: &[u8], out: &mut [u8]) {
        let table = match (from, to) {
            (Codec::Pcmu, Codec::Pcma) => &ULAW_TO_ALAW,
            (Codec::Pcma, Codec::Pcmu) => &ALAW_TO_ULAW,
            (Codec::Pcmu, Codec::Pcmu) | (Codec::Pcma, Codec::Pcma) => {
                let n = input.len().min(out.len());
                out[..n].copy_from_slice(&input[..n]);
                return;
            }
        };
        for (o, &b) in out.iter_mut().zip(input) {
            *o = table[usize::from(b)];
        }
    }

    /// [`Codec::transcode`] in place, for relaying a packet without a second buffer. When
    /// `from == to` nothing changes.
    pub(crate) fn transcode_in_place(from: Codec, to: Codec, buf: &mut [u8]) {
        let table = match (from, to) {
            (Codec::Pcmu, Codec::Pcma) => &ULAW_TO_ALAW,
            (Codec::Pcma, Codec::Pcmu) => &ALAW_TO_ULAW,
            (Codec::Pcmu, Codec::Pcmu) | (Codec::Pcma, Codec::Pcma) => return,
        };
        for b in buf {
            *b = table[usize::from(*b)];
        }
    }
}

const ULAW_SILENCE: u8 = 0xFF;
const ALAW_SILENCE: u8 = 0xD5;
/// µ-law bias added to the magnitude before the segment search (33 << 2).
const ULAW_BIAS: i32 = 0x84;
/// A-law codes are transmitted with the even bits inverted.
const ALAW_AMI_MASK: u8 = 0x55;

/// Index of the highest set bit of `x` (which must be non-zero).
const fn top_bit(x: u32) -> u32 {
    31 - x.leading_zeros()
}

/// Encodes one 16-bit linear sample to µ-law.
pub(crate) const fn ulaw_encode(s: i16) -> u8 {
    let linear = s as i32;
    // Negative values use the one's complement (-x - 1) so that x and -x-1
    // map to mirror-image codes and -32768 needs no special case.
    let (magnitude, mask) = if linear < 0 {
        (ULAW_BIAS - linear - 1, 0x7Fu8)
    } else {
        (ULAW_BIAS + linear, 0xFFu8)
    };
    // magnitude is in 0x84..=0x8083, so `| 0xFF` keeps it non-zero and the
    // segment in 0..=8; 8 means "beyond full scale".
    let seg = top_bit((magnitude | 0xFF) as u32) - 7;
    if seg >= 8 {
        return 0x7F ^ mask;
    }
    let mantissa = ((magnitude >> (seg + 3)) & 0x0F) as u8;
    (((seg as u8) << 4) | mantissa) ^ mask
}

/// Decodes one µ-law byte to 16-bit linear (range -32124..=32124).
#[cfg(test)]
pub(crate) fn ulaw_decode(b: u8) -> i16 {
    ULAW_TO_LINEAR[usize::from(b)]
}

/// Encodes one 16-bit linear sample to A-law.
pub(crate) const fn alaw_encode(s: i16) -> u8 {
    let linear = s as i32;
    let (magnitude, mask) = if linear >= 0 {
        (linear, ALAW_AMI_MASK | 0x80)
    } else {
        (-linear - 1, ALAW_AMI_MASK)
    };
    // magnitude is in 0..=32767, so the segment is in 0..=7.
    let seg = top_bit((magnitude | 0xFF) as u32) - 7;
    let shift = if seg == 0 { 4 } else { seg + 3 };
    let mantissa = ((magnitude >> shift) & 0x0F) as u8;
    (((seg as u8) << 4) | mantissa) ^ mask
}

/// Decodes one A-law byte to 16-bit linear (range -32256..=32256).
#[cfg(test)]
pub(crate) fn alaw_decode(b: u8) -> i16 {
    ALAW_TO_LINEAR[usize::from(b)]
}

const fn ulaw_decode_calc(b: u8) -> i16 {
    let u = !b;
    let mantissa = (u & 0x0F) as i32;
    let seg = ((u & 0x70) >> 4) as i32;
    let t = ((mantissa << 3) + ULAW_BIAS) << seg;
    if u & 0x80 != 0 {
        (ULAW_BIAS - t) as i16
    } else {
        (t - ULAW_BIAS) as i16
    }
}

const fn alaw_decode_calc(b: u8) -> i16 {
    let a = b ^ ALAW_AMI_MASK;
    let mantissa = ((a & 0x0F) as i32) << 4;
    let seg = ((a & 0x70) >> 4) as i32;
    let magnitude = if seg == 0 {
        mantissa + 8
    } else {
        (mantissa + 0x108) << (seg - 1)
    };
    if a & 0x80 != 0 {
        magnitude as i16
    } else {
        -magnitude as i16
    }
}

const fn build_decode_table(ulaw: bool) -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = if ulaw {
            ulaw_decode_calc(i as u8)
        } else {
            alaw_decode_calc(i as u8)
        };
        i += 1;
    }
    table
}

const fn build_transcode_table(from_ulaw: bool) -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = if from_ulaw {
            alaw_encode(ulaw_decode_calc(i as u8))
        } else {
            ulaw_encode(alaw_decode_calc(i as u8))
        };
        i += 1;
    }
    table
}

/// µ-law code -> linear sample.
static ULAW_TO_LINEAR: [i16; 256] = build_decode_table(true);
/// A-law code -> linear sample.
static ALAW_TO_LINEAR: [i16; 256] = build_decode_table(false);
/// µ-law code -> A-law code (decode then encode).
static ULAW_TO_ALAW: [u8; 256] = build_transcode_table(true);
/// A-law code -> µ-law code (decode then encode).
static ALAW_TO_ULAW: [u8; 256] = build_transcode_table(false);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_types_and_names() {
        assert_eq!(Codec::Pcmu.payload_type(), 0);
        assert_eq!(Codec::Pcma.payload_type(), 8);
        assert_eq!(Codec::Pcmu.encoding_name(), "PCMU");
        assert_eq!(Codec::Pcma.encoding_name(), "PCMA");
        assert_eq!(Codec::from_encoding_name("pcmu"), Some(Codec::Pcmu));
        assert_eq!(Codec::from_encoding_name("PcMa"), Some(Codec::Pcma));
        assert_eq!(Codec::from_encoding_name("PCMA"), Some(Codec::Pcma));
        assert_eq!(Codec::from_encoding_name("G722"), None);
        assert_eq!(Codec::from_encoding_name(""), None);
        assert_eq!(Codec::Pcmu.silence_byte(), 0xFF);
        assert_eq!(Codec::Pcma.silence_byte(), 0xD5);
    }

    #[test]
    fn ulaw_known_vectors() {
        assert_eq!(ulaw_encode(0), 0xFF);
        assert_eq!(ulaw_encode(-1), 0x7F);
        assert_eq!(ulaw_decode(0xFF), 0);
        assert_eq!(ulaw_decode(0x7F), 0);
        assert_eq!(ulaw_decode(0x00), -32124);
        assert_eq!(ulaw_decode(0x80), 32124);
        assert_eq!(ulaw_encode(i16::MAX), 0x80);
        assert_eq!(ulaw_encode(i16::MIN), 0x00);
        assert_eq!(ulaw_encode(32124), 0x80);
        assert_eq!(ulaw_encode(-32124), 0x00);
        // First segment boundaries: the smallest non-zero steps are 8.
        assert_eq!(ulaw_decode(0xFE), 8);
        assert_eq!(ulaw_decode(0x7E), -8);
        // Segment 0/1 boundary (ITU-T G.711 table 2a, decision value 31 in
        // 14-bit units = 124 in 16-bit units).
        assert_eq!(ulaw_decode(0xF0), 120);
        assert_eq!(ulaw_decode(0xEF), 132);
    }

    #[test]
    fn alaw_known_vectors() {
        assert_eq!(alaw_encode(0), 0xD5);
        assert_eq!(alaw_encode(-1), 0x55);
        assert_eq!(alaw_decode(0xD5), 8);
        assert_eq!(alaw_decode(0x55), -8);
        assert_eq!(alaw_encode(i16::MAX), 0xAA);
        assert_eq!(alaw_encode(i16::MIN), 0x2A);
        assert_eq!(alaw_decode(0xAA), 32256);
        assert_eq!(alaw_decode(0x2A), -32256);
        // Segment 1 starts at 256 (mantissa 0 decodes to the interval middle 264).
        assert_eq!(alaw_decode(0x80 ^ 0x55 ^ 0x10), 264);
        assert_eq!(alaw_encode(256), 0x80 ^ 0x55 ^ 0x10);
        assert_eq!(alaw_encode(255), 0x80 ^ 0x55 ^ 0x0F);
    }

    #[test]
    fn round_trip_all_codes() {
        for code in 0..=255u8 {
            let u = ulaw_encode(ulaw_decode(code));
            if code == 0x7F {
                assert_eq!(u, 0xFF, "µ-law negative zero");
            } else {
                assert_eq!(u, code, "µ-law code {code:#04x}");
            }
            assert_eq!(alaw_encode(alaw_decode(code)), code, "A-law {code:#04x}");
        }
    }

    #[test]
    fn encode_is_monotonic_and_close() {
        let mut prev_u = ulaw_decode(ulaw_encode(i16::MIN));
        let mut prev_a = alaw_decode(alaw_encode(i16::MIN));
        for s in i16::MIN..=i16::MAX {
            let du = ulaw_decode(ulaw_encode(s));
            let da = alaw_decode(alaw_encode(s));
            assert!(du >= prev_u, "µ-law not monotonic at {s}");
            assert!(da >= prev_a, "A-law not monotonic at {s}");
            prev_u = du;
            prev_a = da;
            // Quantisation error bounded by half a step of the top segment
            // (plus clipping beyond the largest code).
            let s32 = i32::from(s);
            let clip_u = s32.clamp(-32124, 32124);
            let clip_a = s32.clamp(-32256, 32256);
            assert!((i32::from(du) - clip_u).abs() <= 512, "µ-law error at {s}");
            assert!((i32::from(da) - clip_a).abs() <= 512, "A-law error at {s}");
        }
    }

    #[test]
    fn decode_tables_are_monotonic_per_sign() {
        // µ-law positive codes 0x80..=0xFF: 0x80 is the largest, 0xFF zero.
        for c in 0x80..0xFFu8 {
            assert!(ulaw_decode(c) > ulaw_decode(c + 1));
        }
        for c in 0x00..0x7Fu8 {
            assert!(ulaw_decode(c) < ulaw_decode(c + 1));
        }
        // A-law: after removing the AMI mask, magnitude grows with the code.
        for m in 0..0x7Fu8 {
            let pos = |x: u8| alaw_decode((x | 0x80) ^ 0x55);
            let neg = |x: u8| alaw_decode(x ^ 0x55);
            assert!(pos(m) < pos(m + 1));
            assert!(neg(m) > neg(m + 1));
        }
    }

    #[test]
    fn transcode_matches_decode_encode() {
        let all: Vec<u8> = (0..=255u8).collect();
        let mut out = vec![0u8; 256];
        Codec::transcode(Codec::Pcmu, Codec::Pcma, &all, &mut out);
        for (&c, &o) in all.iter().zip(&out) {
            assert_eq!(o, alaw_encode(ulaw_decode(c)));
        }
        Codec::transcode(Codec::Pcma, Codec::Pcmu, &all, &mut out);
        for (&c, &o) in all.iter().zip(&out) {
            assert_eq!(o, ulaw_encode(alaw_decode(c)));
        }
        Codec::transcode(Codec::Pcma, Codec::Pcma, &all, &mut out);
        assert_eq!(out, all);
        // In place gives the same bytes.
        for (from, to) in [
            (Codec::Pcmu, Codec::Pcma),
            (Codec::Pcma, Codec::Pcmu),
            (Codec::Pcmu, Codec::Pcmu),
            (Codec::Pcma, Codec::Pcma),
        ] {
            Codec::transcode(from, to, &all, &mut out);
            let mut in_place = all.clone();
            Codec::transcode_in_place(from, to, &mut in_place);
            assert_eq!(in_place, out);
        }
        // µ-law silence is exactly 0, so it maps to A-law silence; A-law's
        // smallest code is +8, which µ-law represents exactly (0xFE).
        assert_eq!(ULAW_TO_ALAW[usize::from(ULAW_SILENCE)], ALAW_SILENCE);
        assert_eq!(ALAW_TO_ULAW[usize::from(ALAW_SILENCE)], 0xFE);
        // Mismatched lengths never panic.
        let mut short = [0u8; 3];
        Codec::transcode(Codec::Pcmu, Codec::Pcma, &all, &mut short);
        Codec::transcode(Codec::Pcmu, Codec::Pcmu, &all, &mut short);
        assert_eq!(short, [0, 1, 2]);
    }

    #[test]
    fn slice_encode_decode() {
        let pcm: Vec<i16> = (-40..40).map(|i| i * 800).collect();
        for codec in [Codec::Pcmu, Codec::Pcma] {
            let mut enc = vec![0u8; pcm.len()];
            codec.encode(&pcm, &mut enc);
            let mut dec = vec![0i16; pcm.len()];
            codec.decode(&enc, &mut dec);
            for (&a, &b) in pcm.iter().zip(&dec) {
                assert!((i32::from(a) - i32::from(b)).abs() <= 512);
            }
            let silence = [0i16; 4];
            let mut enc = [0u8; 4];
            codec.encode(&silence, &mut enc);
            assert_eq!(enc, [codec.silence_byte(); 4]);
            // Mismatched lengths never panic.
            let mut short = [0i16; 2];
            codec.decode(&[0u8; 10], &mut short);
            let mut long = [7u8; 10];
            codec.encode(&[0i16; 2], &mut long);
            assert_eq!(long[2], 7);
        }
    }
}
