//! Recording a caller (the spoken description of a problem) to a WAV file with hound.
//!
//! Two halves: the media clock meters each packet as it arrives ([`VoiceMeter`]: stop after
//! `silence` of quiet once the caller has spoken, or at `max`; time is passed in), and the call
//! writes the decoded 16-bit samples to an 8 kHz mono WAV file ([`Recorder`]), off the clock's
//! thread. File names are chosen by the caller of [`Recorder::create`] (generated, never taken
//! from caller input).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mean absolute amplitude below which a 20 ms frame counts as silence (about -40 dBFS).
const SILENCE_LEVEL: u32 = 330;

/// Mode of a recording file: read and write for the server's user only.
pub(crate) const PRIVATE_FILE: u32 = 0o600;
/// Mode of a directory created for recordings.
pub(crate) const PRIVATE_DIR: u32 = 0o700;

/// Creates `dir` and any missing parents with mode [`PRIVATE_DIR`]; an existing directory is
/// left as it is (see [`loose_permissions`]).
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, PRIVATE_DIR);
    b.create(dir)
}

/// The mode of `dir` when it lets users other than its owner in (group or other bits set),
/// for a warning at start: recordings in it stay unreadable to them (files are 0600), but
/// their names and times are listed.
pub(crate) fn loose_permissions(dir: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// The path of recording `name` (as stored with a ticket) in `dir`, if `name` is a plain file
/// name: nothing stored can point outside the recordings directory.
pub(crate) fn recording_path(dir: &Path, name: &str) -> Option<PathBuf> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(n)), None) if n == name => Some(dir.join(n)),
        _ => None,
    }
}

/// Why recording stopped (or may go on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordState {
    Recording,
    /// Quiet for the silence limit after the caller spoke.
    Silence,
    /// The maximum length was reached.
    MaxLength,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Wav { path: PathBuf, source: hound::Error },
}

/// One recording in progress.
pub(crate) struct Recorder {
    writer: Option<hound::WavWriter<BufWriter<File>>>,
    path: PathBuf,
    samples: u64,
}

/// When a recording ends (the caller fell silent after speaking, or the limit), without the
/// file: the media clock meters each packet as it arrives and leaves the writing to the call
/// (a disk that stalls must not stall the packets of every call on that clock).
#[derive(Debug, Clone)]
pub(crate) struct VoiceMeter {
    started: Instant,
    last_voice: Option<Instant>,
    max: Duration,
    silence: Duration,
}

impl VoiceMeter {
    pub(crate) fn new(now: Instant, max: Duration, silence: Duration) -> Self {
        VoiceMeter {
            started: now,
            last_voice: None,
            max,
            silence,
        }
    }

    /// Hear one packet's samples.
    pub(crate) fn hear(&mut self, now: Instant, pcm: &[i16]) -> RecordState {
        let level = if pcm.is_empty() {
            0
        } else {
            pcm.iter().map(|s| s.unsigned_abs() as u32).sum::<u32>() / pcm.len() as u32
        };
        if level >= SILENCE_LEVEL {
            self.last_voice = Some(now);
        }
        self.state(now)
    }

    pub(crate) fn state(&self, now: Instant) -> RecordState {
        if now.duration_since(self.started) >= self.max {
            return RecordState::MaxLength;
        }
        let since = self.last_voice.unwrap_or(self.started);
        if now.duration_since(since) >= self.silence {
            return RecordState::Silence;
        }
        RecordState::Recording
    }
}

impl Recorder {
    /// Starts a new recording at `path` (which must not exist). The file is readable by the
    /// server's user only (0600), and directories created for it likewise (0700): a recording
    /// of a caller is personal data.
    pub(crate) fn create(path: &Path) -> Result<Recorder, RecordError> {
        if let Some(dir) = path.parent() {
            create_private_dir(dir).map_err(|source| RecordError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, PRIVATE_FILE);
        let file = options.open(path).map_err(|source| RecordError::Io {
            path: path.to_owned(),
            source,
        })?;
        let writer = hound::WavWriter::new(BufWriter::new(file), spec).map_err(|source| {
            RecordError::Wav {
                path: path.to_owned(),
                source,
            }
        })?;
        Ok(Recorder {
            writer: Some(writer),
            path: path.to_owned(),
            samples: 0,
        })
    }

    /// Seconds recorded so far.
    pub(crate) fn seconds(&self) -> f64 {
        self.samples as f64 / 8000.0
    }

    /// Append samples metered elsewhere (see [`VoiceMeter`]).
    pub(crate) fn write(&mut self, pcm: &[i16]) {
        if let Some(w) = &mut self.writer {
            for s in pcm {
                if w.write_sample(*s).is_err() {
                    break;
                }
            }
        }
        self.samples += pcm.len() as u64;
    }

    pub(crate) fn finish(mut self) -> Result<Option<PathBuf>, RecordError> {
        if let Some(w) = self.writer.take() {
            w.finalize().map_err(|source| RecordError::Wav {
                path: self.path.clone(),
                source,
            })?;
        }
        if self.samples == 0 {
            let _ = std::fs::remove_file(&self.path);
            return Ok(None);
        }
        Ok(Some(self.path.clone()))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // A recording dropped without finish (call torn down) is still closed properly.
        if let Some(w) = self.writer.take() {
            let _ = w.finalize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::g711::Codec;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ivr311-rec-{}-{name}.wav", std::process::id()))
    }

    /// One received payload, as the clock meters it and the call writes it.
    fn push(
        r: &mut Recorder,
        meter: &mut VoiceMeter,
        now: Instant,
        codec: Codec,
        payload: &[u8],
    ) -> RecordState {
        let mut pcm = vec![0i16; payload.len()];
        codec.decode(payload, &mut pcm);
        r.write(&pcm);
        meter.hear(now, &pcm)
    }

    #[test]
    fn records_until_silence_after_speech() {
        let t0 = Instant::now();
        let p = tmp("silence");
        let mut r = Recorder::create(&p).unwrap();
        let mut meter = VoiceMeter::new(t0, Duration::from_secs(60), Duration::from_secs(2));
        let mut loud = [0u8; 160];
        let pcm: Vec<i16> = (0..160)
            .map(|i| if i % 2 == 0 { 8000 } else { -8000 })
            .collect();
        Codec::Pcmu.encode(&pcm, &mut loud);
        let quiet = [0xFFu8; 160];
        let ms = Duration::from_millis;
        for i in 0..50 {
            assert_eq!(
                push(&mut r, &mut meter, t0 + ms(20 * i), Codec::Pcmu, &loud),
                RecordState::Recording
            );
        }
        let mut t = t0 + ms(1000);
        let mut stopped = None;
        for i in 0..200 {
            t = t0 + ms(1000 + 20 * i);
            if push(&mut r, &mut meter, t, Codec::Pcmu, &quiet) == RecordState::Silence {
                stopped = Some(t);
                break;
            }
        }
        let stopped = stopped.expect("silence ends it");
        assert!(
            stopped - t0 >= ms(2900) && stopped - t0 <= ms(3100),
            "{:?}",
            stopped - t0
        );
        let _ = t;
        let path = r.finish().unwrap().expect("audio kept");
        let reader = hound::WavReader::open(&path).unwrap();
        assert_eq!(reader.spec().sample_rate, 8000);
        assert!(reader.duration() > 8000 * 2);
        let _ = std::fs::remove_file(path);
    }

    #[cfg(unix)]
    #[test]
    fn recordings_are_private_to_the_server_user() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "ivr311-rec-private-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let p = dir.join("sub").join("call.wav");
        let mut r = Recorder::create(&p).unwrap();
        r.write(&[1000; 160]);
        let path = r.finish().unwrap().expect("kept");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("sub")), 0o700);
        assert_eq!(loose_permissions(&dir), None);
        // A second recording never overwrites one already there.
        assert!(Recorder::create(&p).is_err());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(loose_permissions(&dir), Some(0o755));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn recording_names_stay_in_the_directory() {
        let d = Path::new("/var/lib/ivr311/recordings");
        assert_eq!(
            recording_path(d, "1700000000-0a1b2c3d.wav"),
            Some(d.join("1700000000-0a1b2c3d.wav"))
        );
        for bad in [
            "",
            "..",
            ".",
            "../x.wav",
            "a/b.wav",
            "/etc/passwd",
            "./x.wav",
            "x.wav/",
        ] {
            assert_eq!(recording_path(d, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn max_length_and_empty_recordings() {
        let t0 = Instant::now();
        let p = tmp("max");
        let r = Recorder::create(&p).unwrap();
        let meter = VoiceMeter::new(t0, Duration::from_secs(5), Duration::from_secs(60));
        assert_eq!(
            meter.state(t0 + Duration::from_secs(5)),
            RecordState::MaxLength
        );
        assert_eq!(r.finish().unwrap(), None, "nothing recorded, no file");
        assert!(!p.exists());
    }
}
