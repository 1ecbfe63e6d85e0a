//! Voice prompts: WAV files loaded once at startup, shared by every call.
//!
//! Owns: reading WAV files (any sample rate; any channel count, downmixed to
//! mono; 8/16/24/32-bit integer or 32-bit float), resampling them to 8 kHz
//! with an anti-aliased resampler (rubato's FFT resampler), pre-encoding them
//! in both G.711 laws, cutting them into 20 ms RTP-sized frames, and the
//! [`PromptStore`] that indexes them by `(language, name)`.
//!
//! Must not touch: RTP sending and pacing, call state, configuration parsing,
//! or the G.711 algorithms themselves (those live in [`crate::media::g711`]).
//! Loading does blocking file I/O and CPU work, so call it at startup or from
//! a blocking task, never inside a per-packet path. Once built, a [`Prompt`]
//! is immutable and cheap to share through its `Arc`.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rubato::{FftFixedInOut, Resampler};

use crate::media::g711::Codec;

/// Sample rate of every prompt after loading.
pub(crate) const SAMPLE_RATE: u32 = 8000;
/// Samples (= G.711 bytes) in one 20 ms frame at 8 kHz.
pub(crate) const FRAME_SAMPLES: usize = 160;
/// Longest prompt accepted, to bound memory on a bad or hostile file.
pub(crate) const MAX_PROMPT_SECONDS: u64 = 15 * 60;
/// Lowest source sample rate accepted.
pub(crate) const MIN_SOURCE_RATE: u32 = 1000;
/// Highest source sample rate accepted.
pub(crate) const MAX_SOURCE_RATE: u32 = 384_000;

/// Why a prompt could not be loaded. Every variant names the file (or, for a prompt the unit
/// tests build from samples, a `<pcm:NAME>` pseudo-path).
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The file or directory could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid WAV file (or its sample data is corrupt).
    #[error("invalid WAV file {}: {source}", path.display())]
    Wav {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: hound::Error,
    },
    /// A valid WAV file in a format this loader does not handle.
    #[error("unsupported audio in {}: {reason}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported.
        reason: String,
    },
    /// The resampler failed.
    #[error("cannot resample {} to 8000 Hz: {source}", path.display())]
    Resample {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The file holds no audio samples.
    #[error("prompt {} has no audio", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// One prompt, converted to 8 kHz mono and pre-encoded in both laws, shared by every call (Arc).
#[derive(Clone)]
pub struct Prompt {
    /// Prompt name (the file stem for files, e.g. `welcome`).
    pub name: String,
    pcm: Vec<i16>,
    ulaw: Vec<u8>,
    alaw: Vec<u8>,
}

/// One cycle of the North American ringback tone (ANSI T1.401: 440 Hz + 480 Hz, each at
/// -19 dBm0, 2 s on, 4 s off), generated once and shared. Played, and replayed, to a caller
/// while a leg we dial for them rings (the 911 trunk), so that after "connecting you to 911"
/// they hear the line ringing rather than a silence they could take for a dead call. A tone,
/// not a recording: it is the same in every language and needs no file in `prompts/`.
pub fn ringback() -> Arc<Prompt> {
    static RINGBACK: OnceLock<Arc<Prompt>> = OnceLock::new();
    RINGBACK
        .get_or_init(|| {
            // 0 dBm0 is a sine 3.17 dB below G.711's full scale; -19 dBm0 each tone.
            let peak = 32767.0 * 10f32.powf(-(3.17 + 19.0) / 20.0);
            let rate = SAMPLE_RATE as f32;
            let on = SAMPLE_RATE as usize * 2;
            let mut pcm = vec![0i16; SAMPLE_RATE as usize * 6];
            for (i, s) in pcm[..on].iter_mut().enumerate() {
                let t = i as f32 / rate;
                let v = (std::f32::consts::TAU * 440.0 * t).sin()
                    + (std::f32::consts::TAU * 480.0 * t).sin();
                *s = (v * peak).round() as i16;
            }
            Arc::new(Prompt::from_pcm_8k("ringback", pcm))
        })
        .clone()
}

impl fmt::Debug for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prompt")
            .field("name", &self.name)
            .field("samples", &self.pcm.len())
            .field("duration", &self.duration())
            .finish()
    }
}

impl Prompt {
    /// Loads a WAV file, downmixes it to mono and resamples it to 8 kHz.
    pub fn from_wav_file(name: &str, path: &Path) -> Result<Prompt, PromptError> {
        let file = File::open(path).map_err(|source| PromptError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_wav_reader(name, path, BufReader::new(file))
    }

    /// Reads a WAV file held in memory (an uploaded announcement), as
    /// [`Prompt::from_wav_file`]; `origin` names it in errors.
    pub fn from_wav_bytes(name: &str, origin: &Path, bytes: &[u8]) -> Result<Prompt, PromptError> {
        Self::from_wav_reader(name, origin, std::io::Cursor::new(bytes))
    }

    fn from_wav_reader<R: std::io::Read>(
        name: &str,
        path: &Path,
        input: R,
    ) -> Result<Prompt, PromptError> {
        let reader = hound::WavReader::new(input).map_err(|source| PromptError::Wav {
            path: path.to_path_buf(),
            source,
        })?;
        let spec = reader.spec();
        check_format(path, spec.sample_rate, spec.channels)?;
        let max_frames = u64::from(spec.sample_rate) * MAX_PROMPT_SECONDS;
        if u64::from(reader.duration()) > max_frames {
            return Err(PromptError::Unsupported {
                path: path.to_path_buf(),
                reason: format!("longer than {MAX_PROMPT_SECONDS} s"),
            });
        }
        let mono = match (spec.sample_format, spec.bits_per_sample) {
            (hound::SampleFormat::Float, 32) => {
                read_mono(path, reader.into_samples::<f32>(), spec.channels, |s| s)?
            }
            (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
                let scale = 1.0 / (1u64 << (bits - 1)) as f64;
                read_mono(path, reader.into_samples::<i32>(), spec.channels, |s| {
                    (f64::from(s) * scale) as f32
                })?
            }
            (format, bits) => {
                return Err(PromptError::Unsupported {
                    path: path.to_path_buf(),
                    reason: format!("{bits}-bit {format:?} samples"),
                })
            }
        };
        let prompt = Self::from_mono_f32(name, path, mono, spec.sample_rate)?;
        tracing::debug!(
            name,
            path = %path.display(),
            source_rate = spec.sample_rate,
            channels = spec.channels,
            bits = spec.bits_per_sample,
            samples = prompt.pcm.len(),
            "loaded prompt"
        );
        Ok(prompt)
    }

    /// Builds a prompt from interleaved 16-bit samples at any rate and channel
    /// count (for the unit tests). A trailing partial frame of interleaved samples is
    /// dropped.
    #[cfg(test)]
    pub(crate) fn from_pcm(
        name: &str,
        samples: &[i16],
        sample_rate: u32,
        channels: u16,
    ) -> Result<Prompt, PromptError> {
        let origin = PathBuf::from(format!("<pcm:{name}>"));
        check_format(&origin, sample_rate, channels)?;
        if sample_rate == SAMPLE_RATE && channels == 1 {
            if samples.is_empty() {
                return Err(PromptError::Empty { path: origin });
            }
            return Ok(Self::from_pcm_8k(name, samples.to_vec()));
        }
        let ch = usize::from(channels);
        let mono = samples
            .chunks_exact(ch)
            .map(|frame| {
                let sum: f32 = frame.iter().map(|&s| f32::from(s) / 32768.0).sum();
                sum / f32::from(channels)
            })
            .collect();
        Self::from_mono_f32(name, &origin, mono, sample_rate)
    }

    /// Builds a prompt from mono 16-bit samples at `sample_rate` (resampled to 8 kHz with the
    /// same anti-aliased resampler as files): rendered speech.
    pub(crate) fn from_samples(
        name: &str,
        samples: &[i16],
        sample_rate: u32,
    ) -> Result<Prompt, PromptError> {
        let origin = PathBuf::from(format!("<pcm:{name}>"));
        check_format(&origin, sample_rate, 1)?;
        let mono = samples.iter().map(|&s| f32::from(s) / 32768.0).collect();
        Self::from_mono_f32(name, &origin, mono, sample_rate)
    }

    /// The prompt in `codec`: 8000 Hz samples, one byte each.
    pub fn encoded(&self, codec: Codec) -> &[u8] {
        match codec {
            Codec::Pcmu => &self.ulaw,
            Codec::Pcma => &self.alaw,
        }
    }

    /// The prompt as 8000 Hz mono linear samples.
    pub fn pcm(&self) -> &[i16] {
        &self.pcm
    }

    /// Number of 20 ms (160-sample) frames, counting a final partial frame.
    pub fn frames(&self) -> usize {
        self.pcm.len().div_ceil(FRAME_SAMPLES)
    }

    /// Frame `i` (160 bytes) in `codec`; the final partial frame is padded with the codec's silence byte.
    /// Returns false (and leaves `out` untouched) when `i >= frames()`.
    pub fn frame(&self, codec: Codec, i: usize, out: &mut [u8; FRAME_SAMPLES]) -> bool {
        let data = self.encoded(codec);
        let Some(start) = i.checked_mul(FRAME_SAMPLES) else {
            return false;
        };
        let Some(rest) = data.get(start..) else {
            return false;
        };
        if rest.is_empty() {
            return false;
        }
        let n = rest.len().min(FRAME_SAMPLES);
        out[..n].copy_from_slice(&rest[..n]);
        out[n..].fill(codec.silence_byte());
        true
    }

    /// Playing time (samples / 8000 s, without frame padding).
    pub(crate) fn duration(&self) -> Duration {
        // One sample at 8 kHz is exactly 125 µs.
        Duration::from_micros(self.pcm.len() as u64 * 125)
    }

    pub(crate) fn from_pcm_8k(name: &str, pcm: Vec<i16>) -> Prompt {
        let mut ulaw = vec![0u8; pcm.len()];
        let mut alaw = vec![0u8; pcm.len()];
        Codec::Pcmu.encode(&pcm, &mut ulaw);
        Codec::Pcma.encode(&pcm, &mut alaw);
        Prompt {
            name: name.to_string(),
            pcm,
            ulaw,
            alaw,
        }
    }

    /// `mono` holds samples in [-1, 1] at `rate`.
    fn from_mono_f32(
        name: &str,
        path: &Path,
        mono: Vec<f32>,
        rate: u32,
    ) -> Result<Prompt, PromptError> {
        if mono.is_empty() {
            return Err(PromptError::Empty {
                path: path.to_path_buf(),
            });
        }
        let at_8k = if rate == SAMPLE_RATE {
            mono
        } else {
            resample_to_8k(path, &mono, rate)?
        };
        let pcm: Vec<i16> = at_8k.iter().map(|&x| f32_to_i16(x)).collect();
        if pcm.is_empty() {
            return Err(PromptError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self::from_pcm_8k(name, pcm))
    }
}

fn check_format(path: &Path, rate: u32, channels: u16) -> Result<(), PromptError> {
    if channels == 0 {
        return Err(PromptError::Unsupported {
            path: path.to_path_buf(),
            reason: "zero channels".to_string(),
        });
    }
    if !(MIN_SOURCE_RATE..=MAX_SOURCE_RATE).contains(&rate) {
        return Err(PromptError::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "sample rate {rate} Hz outside {MIN_SOURCE_RATE}..={MAX_SOURCE_RATE} Hz"
            ),
        });
    }
    Ok(())
}

/// Reads interleaved samples, converting each with `to_f32` and averaging
/// the channels of each frame. Non-finite float samples become 0. A read
/// error after at least one whole frame (in practice: a data chunk cut short,
/// a common defect of WAV files written by streaming tools or copied
/// partially) keeps the samples read so far, with a warning; an error before
/// any audio fails the load.
fn read_mono<S, I, F>(
    path: &Path,
    samples: I,
    channels: u16,
    to_f32: F,
) -> Result<Vec<f32>, PromptError>
where
    I: Iterator<Item = Result<S, hound::Error>>,
    F: Fn(S) -> f32,
{
    let ch = usize::from(channels);
    let mut mono = Vec::new();
    let mut acc = 0.0f32;
    let mut in_frame = 0usize;
    for s in samples {
        let s = match s {
            Ok(s) => s,
            // hound reports a data chunk that ends early as an I/O error
            // ("Failed to read enough bytes"); keep what was read.
            Err(hound::Error::IoError(e)) if !mono.is_empty() => {
                tracing::warn!(
                    path = %path.display(),
                    frames = mono.len(),
                    error = %e,
                    "WAV data ends before its header says; using the audio read so far"
                );
                break;
            }
            Err(source) => {
                return Err(PromptError::Wav {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let v = to_f32(s);
        acc += if v.is_finite() { v } else { 0.0 };
        in_frame += 1;
        if in_frame == ch {
            mono.push(acc / f32::from(channels));
            acc = 0.0;
            in_frame = 0;
        }
    }
    Ok(mono)
}

fn f32_to_i16(x: f32) -> i16 {
    // `as` saturates (and maps NaN to 0), the clamp just makes it explicit.
    (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

/// Resamples mono audio at `rate` to 8000 Hz with rubato's FFT resampler
/// (synchronous, exact ratio, with an anti-aliasing low-pass below 4 kHz).
/// The resampler's delay is removed, so the output starts at the same
/// instant as the input and has `round(len * 8000 / rate)` samples.
fn resample_to_8k(path: &Path, mono: &[f32], rate: u32) -> Result<Vec<f32>, PromptError> {
    let resample_err = |source: Box<dyn std::error::Error + Send + Sync>| PromptError::Resample {
        path: path.to_path_buf(),
        source,
    };
    let mut resampler = FftFixedInOut::<f32>::new(rate as usize, SAMPLE_RATE as usize, 1024, 1)
        .map_err(|e| resample_err(Box::new(e)))?;
    let chunk_in = resampler.input_frames_next();
    let chunk_out = resampler.output_frames_next();
    let delay = resampler.output_delay();
    let rate64 = u64::from(rate);
    let expected_u64 = (mono.len() as u64 * u64::from(SAMPLE_RATE) + rate64 / 2) / rate64;
    let expected = usize::try_from(expected_u64).map_err(|e| resample_err(Box::new(e)))?;
    let needed = delay + expected;

    let mut out = Vec::with_capacity(needed + chunk_out);
    let mut input = vec![vec![0.0f32; chunk_in]];
    let mut output = vec![vec![0.0f32; chunk_out]];
    let mut pos = 0usize;
    while out.len() < needed {
        let rest = mono.get(pos..).unwrap_or(&[]);
        let n = rest.len().min(chunk_in);
        input[0][..n].copy_from_slice(&rest[..n]);
        input[0][n..].fill(0.0);
        pos += n;
        let (_, written) = resampler
            .process_into_buffer(&input, &mut output, None)
            .map_err(|e| resample_err(Box::new(e)))?;
        if written == 0 {
            break;
        }
        out.extend_from_slice(&output[0][..written]);
    }
    out.drain(..delay.min(out.len()));
    out.truncate(expected);
    Ok(out)
}

/// Prompts by (language, name), e.g. ("en", "welcome"), loaded from `<dir>/<lang>/<name>.wav`.
#[derive(Debug, Clone, Default)]
pub struct PromptStore {
    prompts: HashMap<(String, String), Arc<Prompt>>,
}

impl PromptStore {
    /// An empty store.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Loads every `<dir>/<lang>/<name>.wav`: each subdirectory of `dir` is a
    /// language and each `*.wav` file in it (extension case-insensitive) a
    /// prompt named after the file stem. Other files, hidden entries and
    /// deeper subdirectories are ignored. Any unreadable directory or bad WAV
    /// file fails the whole load, naming the offending path.
    pub fn load_dir(dir: &Path) -> Result<PromptStore, PromptError> {
        let mut store = PromptStore::new();
        for lang_dir in sorted_entries(dir)? {
            if !lang_dir.is_dir() {
                continue;
            }
            let Some(lang) = visible_utf8_name(&lang_dir, lang_dir.file_name()) else {
                continue;
            };
            for file in sorted_entries(&lang_dir)? {
                let is_wav = file
                    .extension()
                    .is_some_and(|ext| ext.eq_ignore_ascii_case("wav"));
                if !is_wav || !file.is_file() {
                    continue;
                }
                let Some(name) = visible_utf8_name(&file, file.file_stem()) else {
                    continue;
                };
                let prompt = Prompt::from_wav_file(&name, &file)?;
                store.insert(&lang, prompt);
            }
        }
        if store.is_empty() {
            tracing::warn!(dir = %dir.display(), "no prompts found");
        } else {
            tracing::info!(
                dir = %dir.display(),
                prompts = store.len(),
                languages = ?store.languages(),
                "loaded prompts"
            );
        }
        Ok(store)
    }

    /// The prompt `name` in language `lang`.
    pub fn get(&self, lang: &str, name: &str) -> Option<Arc<Prompt>> {
        self.prompts
            .get(&(lang.to_string(), name.to_string()))
            .cloned()
    }

    /// Adds (or replaces) `prompt` under `(lang, prompt.name)`.
    pub(crate) fn insert(&mut self, lang: &str, prompt: Prompt) {
        let key = (lang.to_string(), prompt.name.clone());
        if self.prompts.insert(key, Arc::new(prompt)).is_some() {
            tracing::debug!(lang, "replaced an existing prompt");
        }
    }

    /// Languages that have at least one prompt, sorted.
    pub(crate) fn languages(&self) -> Vec<String> {
        let mut langs: Vec<String> = self.prompts.keys().map(|(l, _)| l.clone()).collect();
        langs.sort();
        langs.dedup();
        langs
    }

    /// Number of prompts over all languages.
    pub(crate) fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether the store has no prompts.
    pub(crate) fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// Prompt names in language `lang`, sorted.
    #[cfg(test)]
    pub(crate) fn names(&self, lang: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .prompts
            .keys()
            .filter(|(l, _)| l == lang)
            .map(|(_, n)| n.clone())
            .collect();
        names.sort();
        names
    }
}

/// Paths of the entries of `dir`, sorted so loading order (and so which error
/// is reported first) is deterministic.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, PromptError> {
    let io_err = |source| PromptError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        paths.push(entry.map_err(io_err)?.path());
    }
    paths.sort();
    Ok(paths)
}

/// `name` as UTF-8, or None (with a warning for non-UTF-8) when it is missing,
/// hidden (starts with `.`) or not valid UTF-8.
fn visible_utf8_name(path: &Path, name: Option<&std::ffi::OsStr>) -> Option<String> {
    let name = name?;
    let Some(name) = name.to_str() else {
        tracing::warn!(path = %path.display(), "skipping prompt path that is not UTF-8");
        return None;
    };
    if name.is_empty() || name.starts_with('.') {
        return None;
    }
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Power of `f` Hz in `x` (Goertzel), per sample.
    fn tone_power(x: &[i16], f: f32) -> f32 {
        let w = std::f32::consts::TAU * f / SAMPLE_RATE as f32;
        let (mut s1, mut s2) = (0f32, 0f32);
        for &v in x {
            let s0 = f32::from(v) + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        (s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2) / (x.len() as f32).powi(2)
    }

    #[test]
    fn ringback_is_440_and_480_hz_for_two_seconds_then_four_of_silence() {
        let r = ringback();
        assert_eq!(r.duration(), Duration::from_secs(6));
        let (on, off) = r.pcm().split_at(16000);
        assert!(off.iter().all(|&v| v == 0), "the 4 s off are silent");
        let (p440, p480, p1000) = (
            tone_power(on, 440.0),
            tone_power(on, 480.0),
            tone_power(on, 1000.0),
        );
        assert!(
            p440 > 1000.0 * p1000 && p480 > 1000.0 * p1000,
            "{p440} {p480} {p1000}"
        );
        // Each tone at -19 dBm0: amplitude ~2,540 of 32,767 (Goertzel power ~ (A/2)^2).
        let amplitude = 2.0 * p440.sqrt();
        assert!((2300.0..2800.0).contains(&amplitude), "{amplitude}");
        // The same tone for every caller: one shared copy.
        assert!(Arc::ptr_eq(&r, &ringback()));
    }
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "ivr311-prompt-test-{}-{tag}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sine(freq: f64, rate: u32, seconds: f64, amplitude: f64) -> Vec<f64> {
        let n = (f64::from(rate) * seconds).round() as usize;
        (0..n)
            .map(|i| {
                amplitude * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin()
            })
            .collect()
    }

    /// Writes `frames` (one value in [-1, 1] per frame, copied to every
    /// channel) as a WAV file in the given format.
    fn write_wav(
        path: &Path,
        frames: &[f64],
        rate: u32,
        channels: u16,
        format: hound::SampleFormat,
        bits: u16,
    ) {
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: format,
        };
        let mut w = hound::WavWriter::create(path, spec).expect("create wav");
        for &x in frames {
            for _ in 0..channels {
                match (format, bits) {
                    (hound::SampleFormat::Float, _) => w.write_sample(x as f32),
                    (_, 8) => w.write_sample((x * 127.0).round() as i8),
                    (_, 16) => w.write_sample((x * 32767.0).round() as i16),
                    (_, 24) => w.write_sample((x * 8_388_607.0).round() as i32),
                    _ => w.write_sample((x * 2_147_483_647.0).round() as i32),
                }
                .expect("write sample");
            }
        }
        w.finalize().expect("finalize wav");
    }

    /// Peak amplitude of a steady sine, from the RMS of the middle half
    /// (away from resampler edge effects), in full-scale units.
    fn sine_amplitude(pcm: &[i16]) -> f64 {
        let mid = &pcm[pcm.len() / 4..pcm.len() * 3 / 4];
        let ms: f64 = mid
            .iter()
            .map(|&s| (f64::from(s) / 32768.0).powi(2))
            .sum::<f64>()
            / mid.len() as f64;
        ms.sqrt() * std::f64::consts::SQRT_2
    }

    fn assert_len_close(p: &Prompt, seconds: f64) {
        let expected = seconds * 8000.0;
        let got = p.pcm().len() as f64;
        assert!(
            (got - expected).abs() <= expected * 0.01,
            "{}: {got} samples, expected about {expected}",
            p.name
        );
        let d = p.duration().as_secs_f64();
        assert!((d - seconds).abs() <= seconds * 0.01, "duration {d}");
    }

    #[test]
    fn wav_8k_mono_16bit_is_exact() {
        let tmp = TempDir::new("8k");
        let path = tmp.0.join("exact.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let samples: Vec<i16> = (0..8000)
            .map(|i| ((i * 37) % 65536 - 32768) as i16)
            .collect();
        let mut w = hound::WavWriter::create(&path, spec).expect("create");
        for &s in &samples {
            w.write_sample(s).expect("write");
        }
        w.finalize().expect("finalize");

        let p = Prompt::from_wav_file("exact", &path).expect("load");
        assert_eq!(p.name, "exact");
        assert_eq!(p.pcm(), &samples[..]);
        assert_eq!(p.duration(), Duration::from_secs(1));
        assert_eq!(p.frames(), 50);
        let mut ulaw = vec![0u8; samples.len()];
        Codec::Pcmu.encode(&samples, &mut ulaw);
        assert_eq!(p.encoded(Codec::Pcmu), &ulaw[..]);
        let mut alaw = vec![0u8; samples.len()];
        Codec::Pcma.encode(&samples, &mut alaw);
        assert_eq!(p.encoded(Codec::Pcma), &alaw[..]);
    }

    #[test]
    fn wav_16k_stereo_sine_keeps_amplitude() {
        let tmp = TempDir::new("16k");
        let path = tmp.0.join("tone.wav");
        let tone = sine(1000.0, 16000, 1.0, 0.5);
        write_wav(&path, &tone, 16000, 2, hound::SampleFormat::Int, 16);
        let p = Prompt::from_wav_file("tone", &path).expect("load");
        assert_len_close(&p, 1.0);
        let amp = sine_amplitude(p.pcm());
        assert!((amp - 0.5).abs() < 0.05, "amplitude {amp}");
    }

    #[test]
    fn wav_44k1_float_sine_keeps_amplitude() {
        let tmp = TempDir::new("44k");
        let path = tmp.0.join("tone.wav");
        let tone = sine(1000.0, 44100, 1.5, 0.25);
        write_wav(&path, &tone, 44100, 1, hound::SampleFormat::Float, 32);
        let p = Prompt::from_wav_file("tone", &path).expect("load");
        assert_len_close(&p, 1.5);
        let amp = sine_amplitude(p.pcm());
        assert!((amp - 0.25).abs() < 0.025, "amplitude {amp}");
    }

    #[test]
    fn other_int_depths_and_rates() {
        let tmp = TempDir::new("depths");
        let cases: [(u32, u16, u16); 4] = [
            (22050, 1, 8),
            (48000, 2, 24),
            (11025, 6, 32),
            (32000, 1, 16),
        ];
        for (rate, channels, bits) in cases {
            let path = tmp.0.join(format!("t{rate}_{channels}_{bits}.wav"));
            let tone = sine(440.0, rate, 0.8, 0.6);
            write_wav(&path, &tone, rate, channels, hound::SampleFormat::Int, bits);
            let p = Prompt::from_wav_file("t", &path).expect("load");
            assert_len_close(&p, 0.8);
            let amp = sine_amplitude(p.pcm());
            assert!(
                (amp - 0.6).abs() < 0.06,
                "{rate}/{channels}/{bits}: amplitude {amp}"
            );
        }
    }

    #[test]
    fn upsampling_from_below_8k() {
        let tone: Vec<i16> = sine(500.0, 6000, 1.0, 0.5)
            .iter()
            .map(|&x| (x * 32767.0) as i16)
            .collect();
        let p = Prompt::from_pcm("up", &tone, 6000, 1).expect("resample");
        assert_len_close(&p, 1.0);
        let amp = sine_amplitude(p.pcm());
        assert!((amp - 0.5).abs() < 0.05, "amplitude {amp}");
    }

    #[test]
    fn resampler_removes_aliases() {
        // 6 kHz is above the 4 kHz Nyquist limit of 8 kHz audio: it must be
        // filtered out, not folded down to 2 kHz.
        let tone: Vec<i16> = sine(6000.0, 48000, 1.0, 0.8)
            .iter()
            .map(|&x| (x * 32767.0) as i16)
            .collect();
        let p = Prompt::from_pcm("alias", &tone, 48000, 1).expect("resample");
        let amp = sine_amplitude(p.pcm());
        assert!(amp < 0.01, "aliased energy {amp}");
    }

    #[test]
    fn resampler_delay_is_compensated() {
        // An impulse at 0.5 s in 16 kHz audio lands at 0.5 s (sample 4000).
        let mut pcm = vec![0i16; 16000];
        pcm[8000] = 30000;
        let p = Prompt::from_pcm("click", &pcm, 16000, 1).expect("resample");
        assert_eq!(p.pcm().len(), 8000);
        let peak = p
            .pcm()
            .iter()
            .enumerate()
            .max_by_key(|(_, s)| s.unsigned_abs())
            .map(|(i, _)| i);
        let peak = peak.expect("non-empty");
        assert!((3999..=4001).contains(&peak), "peak at {peak}");
    }

    #[test]
    fn stereo_downmix_averages() {
        // Left and right in antiphase cancel out.
        let mut inter = Vec::new();
        for i in 0..1600i16 {
            let v = (i % 100) * 300;
            inter.push(v);
            inter.push(-v);
        }
        let p = Prompt::from_pcm("cancel", &inter, 8000, 2).expect("downmix");
        assert_eq!(p.pcm().len(), 1600);
        assert!(p.pcm().iter().all(|&s| s.abs() <= 1));
        // Odd trailing sample (partial frame) is dropped.
        let p = Prompt::from_pcm("odd", &[100, 100, 200], 8000, 2).expect("downmix");
        assert_eq!(p.pcm(), &[100]);
    }

    #[test]
    fn frames_pad_with_silence() {
        let samples: Vec<i16> = (0..170).map(|i| 1000 + i).collect();
        let p = Prompt::from_pcm("pad", &samples, 8000, 1).expect("build");
        assert_eq!(p.frames(), 2);
        assert_eq!(p.duration(), Duration::from_micros(170 * 125));
        for codec in [Codec::Pcmu, Codec::Pcma] {
            let mut out = [0u8; FRAME_SAMPLES];
            assert!(p.frame(codec, 0, &mut out));
            assert_eq!(&out[..], &p.encoded(codec)[..160]);
            assert!(p.frame(codec, 1, &mut out));
            assert_eq!(&out[..10], &p.encoded(codec)[160..170]);
            assert!(out[10..].iter().all(|&b| b == codec.silence_byte()));
            let mut untouched = [7u8; FRAME_SAMPLES];
            assert!(!p.frame(codec, 2, &mut untouched));
            assert!(!p.frame(codec, usize::MAX, &mut untouched));
            assert!(untouched.iter().all(|&b| b == 7));
        }
        let exact = Prompt::from_pcm("exact", &[5i16; 320], 8000, 1).expect("build");
        assert_eq!(exact.frames(), 2);
        let mut out = [0u8; FRAME_SAMPLES];
        assert!(exact.frame(Codec::Pcma, 1, &mut out));
        assert!(!exact.frame(Codec::Pcma, 2, &mut out));
    }

    #[test]
    fn bad_pcm_parameters_are_errors() {
        assert!(matches!(
            Prompt::from_pcm("e", &[], 8000, 1),
            Err(PromptError::Empty { .. })
        ));
        assert!(matches!(
            Prompt::from_pcm("e", &[], 16000, 2),
            Err(PromptError::Empty { .. })
        ));
        assert!(matches!(
            Prompt::from_pcm("e", &[1], 16000, 2),
            Err(PromptError::Empty { .. })
        ));
        let err = Prompt::from_pcm("z", &[1, 2], 8000, 0).expect_err("0 channels");
        assert!(matches!(err, PromptError::Unsupported { .. }));
        assert!(err.to_string().contains("<pcm:z>"), "{err}");
        let err = Prompt::from_pcm("r", &[1, 2], 0, 1).expect_err("0 Hz");
        assert!(matches!(err, PromptError::Unsupported { .. }));
        assert!(Prompt::from_pcm("r", &[1, 2], u32::MAX, 1).is_err());
        // A single sample survives resampling as (at least) nothing worse than Empty.
        match Prompt::from_pcm("one", &[1000], 44100, 1) {
            Ok(p) => assert!(p.pcm().len() <= 1),
            Err(e) => assert!(matches!(e, PromptError::Empty { .. })),
        }
    }

    #[test]
    fn missing_and_non_wav_files_name_the_path() {
        let tmp = TempDir::new("bad");
        let missing = tmp.0.join("nope.wav");
        let err = Prompt::from_wav_file("nope", &missing).expect_err("missing");
        assert!(matches!(err, PromptError::Io { .. }));
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let text = tmp.0.join("notes.wav");
        std::fs::write(&text, b"this is not a RIFF file at all").expect("write");
        let err = Prompt::from_wav_file("notes", &text).expect_err("not wav");
        assert!(matches!(err, PromptError::Wav { .. }));
        assert!(
            err.to_string().contains(&text.display().to_string()),
            "{err}"
        );

        let empty = tmp.0.join("empty.wav");
        write_wav(&empty, &[], 8000, 1, hound::SampleFormat::Int, 16);
        let err = Prompt::from_wav_file("empty", &empty).expect_err("empty");
        assert!(matches!(err, PromptError::Empty { .. }));
        assert!(
            err.to_string().contains(&empty.display().to_string()),
            "{err}"
        );

        // A WAV cut in the middle of its data keeps what is there.
        let cut = tmp.0.join("cut.wav");
        write_wav(
            &cut,
            &sine(440.0, 8000, 1.0, 0.5),
            8000,
            1,
            hound::SampleFormat::Int,
            16,
        );
        let bytes = std::fs::read(&cut).expect("read");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("truncate");
        let p = Prompt::from_wav_file("cut", &cut).expect("truncated data is kept");
        assert!((3900..4100).contains(&p.pcm().len()), "{}", p.pcm().len());
        // Cut right after the header: no audio at all is an error.
        std::fs::write(&cut, &bytes[..44]).expect("truncate");
        let err = Prompt::from_wav_file("cut", &cut).expect_err("no audio");
        assert!(
            err.to_string().contains(&cut.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn load_dir_finds_languages() {
        let tmp = TempDir::new("store");
        let tone = sine(1000.0, 16000, 0.5, 0.3);
        for lang in ["en", "es"] {
            std::fs::create_dir_all(tmp.0.join(lang)).expect("mkdir");
            write_wav(
                &tmp.0.join(lang).join("welcome.wav"),
                &tone,
                16000,
                1,
                hound::SampleFormat::Int,
                16,
            );
        }
        write_wav(
            &tmp.0.join("en").join("Goodbye.WAV"),
            &tone,
            8000,
            1,
            hound::SampleFormat::Int,
            16,
        );
        std::fs::write(tmp.0.join("en").join("README.txt"), b"not audio").expect("write");
        std::fs::write(tmp.0.join("en").join(".hidden.wav"), b"junk").expect("write");
        std::fs::write(tmp.0.join("stray.wav"), b"junk at top level").expect("write");
        std::fs::create_dir_all(tmp.0.join("en").join("nested")).expect("mkdir");

        let store = PromptStore::load_dir(&tmp.0).expect("load");
        assert_eq!(store.languages(), vec!["en".to_string(), "es".to_string()]);
        assert_eq!(store.len(), 3);
        assert!(!store.is_empty());
        assert_eq!(
            store.names("en"),
            vec!["Goodbye".to_string(), "welcome".to_string()]
        );
        assert_eq!(store.names("es"), vec!["welcome".to_string()]);
        assert!(store.names("fr").is_empty());
        let en = store.get("en", "welcome").expect("en/welcome");
        let es = store.get("es", "welcome").expect("es/welcome");
        assert_eq!(en.name, "welcome");
        assert_eq!(en.pcm().len(), 4000);
        assert_eq!(es.pcm().len(), 4000);
        assert!(store.get("fr", "welcome").is_none());
        assert!(store.get("en", "missing").is_none());

        let mut store = store;
        store.insert(
            "fr",
            Prompt::from_pcm("beep", &[0; 80], 8000, 1).expect("pcm"),
        );
        assert_eq!(store.len(), 4);
        assert!(store.get("fr", "beep").is_some());
    }

    #[test]
    fn load_dir_errors_name_the_path() {
        let tmp = TempDir::new("storebad");
        let missing = tmp.0.join("no-such-dir");
        let err = PromptStore::load_dir(&missing).expect_err("missing dir");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        std::fs::create_dir_all(tmp.0.join("en")).expect("mkdir");
        let bad = tmp.0.join("en").join("broken.wav");
        std::fs::write(&bad, b"RIFF....WAVEjunk").expect("write");
        let err = PromptStore::load_dir(&tmp.0).expect_err("bad wav");
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );

        let empty = TempDir::new("storeempty");
        let store = PromptStore::load_dir(&empty.0).expect("empty dir is fine");
        assert!(store.is_empty());
    }
}
