//! Recording an operator's talk with a caller: one stereo WAV per call, caller left,
//! operator right, 8 kHz 16-bit PCM.
//!
//! Two halves, as [`crate::media::record`]: the media clock decodes each side's packets into
//! a short queue ([`Fifo`]) as it relays them, and at every packet time takes one 20 ms frame
//! of each side (silence for a side that sent nothing, so the channels stay aligned) and hands
//! the interleaved frame to a bounded channel ([`CallTap::tick`]); a full channel drops the
//! frame and counts it, never blocking the clock. A blocking writer task
//! ([`spawn_writer`]) writes the frames to `<name>.wav.part` and, when the tap is dropped (the
//! call ends, the caller is transferred away from the operator, or the server stops),
//! finalises the header and renames the file to `<name>.wav`: only whole recordings are
//! served. A caller back with the operator after a transfer that failed goes on in the same
//! file (appended).
//!
//! Files are named after a hash of the call's Call-ID ([`file_name`]), never after anything
//! the caller sent, and are private (0600 in a 0700 directory) like ticket recordings.

use crate::media::g711::Codec;
use crate::media::mix::{Fifo, FRAME};
use crate::media::record::{create_private_dir, PRIVATE_FILE};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Frames (20 ms each) waiting for the writer at most: 5 seconds.
pub(crate) const QUEUE_FRAMES: usize = 250;

/// The subdirectory of the recordings directory that holds call recordings.
pub(crate) const SUBDIR: &str = "calls";

/// One 20 ms stereo frame, interleaved (caller, operator).
pub(crate) type StereoFrame = [i16; 2 * FRAME];

/// The file name of the recording of the call with `call_id` (hex of its SHA-256, so any
/// Call-ID maps to a plain file name).
pub(crate) fn file_name(call_id: &str) -> String {
    let digest = Sha256::digest(call_id.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("call-{hex}.wav")
}

/// Where the finished recording of `call_id` is, under the recordings directory `dir`.
pub(crate) fn path_for(dir: &Path, call_id: &str) -> PathBuf {
    dir.join(SUBDIR).join(file_name(call_id))
}

/// The clock's side of a call recording: each side's decoded samples, and the channel to the
/// writer.
pub(crate) struct CallTap {
    caller: Fifo,
    operator: Fifo,
    tx: mpsc::Sender<Box<StereoFrame>>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for CallTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallTap").finish_non_exhaustive()
    }
}

impl CallTap {
    /// Queue a G.711 payload the caller (`operator` false) or the operator sent.
    pub(crate) fn push_g711(&mut self, operator: bool, codec: Codec, payload: &[u8]) {
        let fifo = if operator {
            &mut self.operator
        } else {
            &mut self.caller
        };
        let mut pcm = [0i16; FRAME];
        for chunk in payload.chunks(FRAME) {
            codec.decode(chunk, &mut pcm[..chunk.len()]);
            fifo.push(&pcm[..chunk.len()]);
        }
    }

    /// One packet time: a frame of each side (silence where a side sent nothing) to the
    /// writer; dropped and counted when the writer is behind.
    pub(crate) fn tick(&mut self) {
        let (mut left, mut right) = ([0i16; FRAME], [0i16; FRAME]);
        self.caller.pop_frame(&mut left);
        self.operator.pop_frame(&mut right);
        let mut frame = Box::new([0i16; 2 * FRAME]);
        for (i, (l, r)) in left.iter().zip(right.iter()).enumerate() {
            frame[2 * i] = *l;
            frame[2 * i + 1] = *r;
        }
        if self.tx.try_send(frame).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Why a call recording could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallRecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Wav { path: PathBuf, source: hound::Error },
}

/// Open the recording of `call_id` under `dir` and start its writer on `tracker` (so a clean
/// shutdown waits for the header to be written); the tap to put on the caller's slot.
pub(crate) fn spawn_writer(
    dir: &Path,
    call_id: &str,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<CallTap, CallRecordError> {
    let final_path = path_for(dir, call_id);
    let part = final_path.with_extension("wav.part");
    let sub = dir.join(SUBDIR);
    create_private_dir(&sub).map_err(|source| CallRecordError::Io { path: sub, source })?;
    // The caller back with the operator (a transfer that failed): the talk goes on in the same
    // file.
    let mut writer = if std::fs::rename(&final_path, &part).is_ok() {
        hound::WavWriter::append(&part).map_err(|source| CallRecordError::Wav {
            path: part.clone(),
            source,
        })?
    } else {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, PRIVATE_FILE);
        let file = options.open(&part).map_err(|source| CallRecordError::Io {
            path: part.clone(),
            source,
        })?;
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        hound::WavWriter::new(std::io::BufWriter::new(file), spec).map_err(|source| {
            CallRecordError::Wav {
                path: part.clone(),
                source,
            }
        })?
    };
    let (tx, mut rx) = mpsc::channel::<Box<StereoFrame>>(QUEUE_FRAMES);
    let dropped = Arc::new(AtomicU64::new(0));
    let counted = dropped.clone();
    let name = file_name(call_id);
    tracker.spawn_blocking(move || {
        let mut frames: u64 = 0;
        let mut failed = None;
        while let Some(frame) = rx.blocking_recv() {
            if failed.is_some() {
                continue;
            }
            for s in frame.iter() {
                if let Err(e) = writer.write_sample(*s) {
                    failed = Some(e);
                    break;
                }
            }
            frames += 1;
        }
        let dropped = counted.load(Ordering::Relaxed);
        let done = match failed {
            Some(e) => Err(e),
            None => writer.finalize(),
        };
        match done.and_then(|()| std::fs::rename(&part, &final_path).map_err(hound::Error::from)) {
            Ok(()) => info!(
                recording = %name,
                seconds = frames / 50,
                dropped_frames = dropped,
                "call recording finished"
            ),
            Err(e) => {
                warn!(recording = %name, error = %e, "call recording failed");
                let _ = std::fs::remove_file(&part);
            }
        }
    });
    Ok(CallTap {
        caller: Fifo::default(),
        operator: Fifo::default(),
        tx,
        dropped,
    })
}

/// Delete the call recordings under `dir` last written more than `keep` before `now` (the
/// daily retention pass); how many were deleted. A missing directory has nothing to delete.
pub(crate) fn prune(
    dir: &Path,
    now: std::time::SystemTime,
    keep: std::time::Duration,
) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir.join(SUBDIR)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut deleted = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let is_recording = name
            .to_str()
            .is_some_and(|n| n.starts_with("call-") && n.ends_with(".wav"));
        if !is_recording {
            continue;
        }
        let modified = entry.metadata()?.modified()?;
        if now.duration_since(modified).is_ok_and(|age| age > keep) {
            std::fs::remove_file(entry.path())?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_deletes_only_call_recordings_older_than_kept() {
        let dir = std::env::temp_dir().join(format!("ivr311-prune-{}", rand::random::<u64>()));
        let calls = dir.join(SUBDIR);
        std::fs::create_dir_all(&calls).unwrap();
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        for (name, age) in [
            ("call-old.wav", 10),
            ("call-new.wav", 1),
            ("call-part.wav.part", 10),
            ("other.wav", 10),
        ] {
            let f = std::fs::File::create(calls.join(name)).unwrap();
            f.set_modified(now - day * age).unwrap();
        }
        assert_eq!(prune(&dir, now, day * 7).unwrap(), 1);
        let mut left: Vec<String> = std::fs::read_dir(&calls)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["call-new.wav", "call-part.wav.part", "other.wav"]);
        assert_eq!(prune(&dir.join("none"), now, day).unwrap(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_second_stretch_of_the_same_call_goes_on_in_its_file() {
        let dir = std::env::temp_dir().join(format!("ivr311-append-{}", rand::random::<u64>()));
        let tracker = tokio_util::task::TaskTracker::new();
        for _ in 0..2 {
            let mut tap = spawn_writer(&dir, "c@test", &tracker).unwrap();
            for _ in 0..50 {
                tap.tick();
            }
            drop(tap);
            tracker.close();
            tracker.wait().await;
            tracker.reopen();
        }
        let r = hound::WavReader::open(path_for(&dir, "c@test")).unwrap();
        assert_eq!(r.spec().channels, 2);
        assert_eq!(
            r.duration(),
            2 * 50 * FRAME as u32,
            "both stretches, one file"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn file_names_are_plain_and_stable() {
        let a = file_name("abc@198.51.100.1");
        assert_eq!(a, file_name("abc@198.51.100.1"));
        assert_ne!(a, file_name("abd@198.51.100.1"));
        assert!(a.starts_with("call-") && a.ends_with(".wav"));
        assert!(!file_name("../../etc/passwd").contains('/'));
    }

    #[test]
    fn a_side_that_sent_nothing_is_silence_and_a_full_queue_drops() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut tap = CallTap {
            caller: Fifo::default(),
            operator: Fifo::default(),
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        tap.push_g711(false, Codec::Pcmu, &[0x80; FRAME]);
        tap.tick();
        tap.tick();
        let f = rx.try_recv().unwrap();
        assert!(
            f.iter().skip(1).step_by(2).all(|s| *s == 0),
            "right is silent"
        );
        assert!(f.iter().step_by(2).all(|s| *s != 0), "left has the caller");
        assert_eq!(tap.dropped.load(Ordering::Relaxed), 1);
    }
}
