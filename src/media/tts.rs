//! Speech of text not known in advance (a request's status notes, a date, an announcement):
//! espeak-ng, rendered to an 8 kHz [`Prompt`] the prompt player plays like a recorded one.
//!
//! Owns: loading `libespeak-ng.so.1`, the one thread that runs it, the queue in front of that
//! thread, resampling its 22 050 Hz output to 8 kHz, and the cache of rendered texts. Must not
//! touch: calls, menus, RTP. Recorded prompts stay the default wherever they exist; this is for
//! what no recording can say.
//!
//! # Why the library is loaded at run time
//!
//! The library is opened with `dlopen` (the `libloading` crate) when the server starts, not
//! linked: the server then builds on a machine without espeak-ng's development files and runs
//! on one without the library at all. A server that cannot load it (or whose voices fail) logs
//! that once and goes on without speech: [`Speech::render`] answers `None` and the caller of it
//! says the recorded words that exist instead.
//!
//! # One thread, bounded queue, timeout
//!
//! espeak-ng keeps process-wide state and is not thread-safe, and synthesis is CPU work (tens
//! of milliseconds per sentence): it runs on ONE dedicated OS thread per process (shared by
//! every server the process runs, as the tests do), never on a call's task or the media clock.
//! [`Speech::render`] puts the job on that thread's queue, at most `speech.queue` of a server's
//! at once (more: `None` at once), and awaits the answer for at most `speech.timeout_ms`; a late
//! answer still fills the cache, and a job whose caller gave up is skipped. Synthesis uses `AUDIO_OUTPUT_SYNCHRONOUS` with a callback that collects the
//! samples; the text is plain UTF-8 (no SSML, no phoneme input), cut to `speech.max_chars`, and
//! the audio to [`MAX_SECONDS`].
//!
//! Rendered prompts are cached by (language, text), at most `speech.cache_entries` of them, the
//! least recently used dropped first. Texts are never logged (status notes may name people or
//! places), only their length.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::oneshot;

use crate::media::prompt::Prompt;

/// The longest audio one text may render to; the rest is cut.
pub const MAX_SECONDS: usize = 120;

/// Settings of `speech:` in the settings file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SpeechConfig {
    /// The espeak-ng voice per menu language. Default `{en: en-us, es: es-419}`. A language
    /// without a voice here has no speech (its recorded words are said).
    pub voices: BTreeMap<String, String>,
    /// Rendered texts kept (least recently used dropped first). Default 256; 0 keeps none.
    pub cache_entries: usize,
    /// The shared library opened at start. Default `libespeak-ng.so.1` (found the way the
    /// dynamic linker finds libraries). A path that cannot be opened turns speech off.
    pub library: PathBuf,
    /// How long a call waits for a text to be rendered before it says the recorded words
    /// instead. Default 3000 ms.
    pub timeout_ms: u64,
    /// Texts waiting for the speech thread at most; more are refused at once (recorded words
    /// instead). Default 32.
    pub queue: usize,
    /// Characters of one text spoken at most; the rest is cut. Default 1000.
    pub max_chars: usize,
    /// `false` turns speech off. Default `true`.
    pub enabled: bool,
    /// The IANA time zone dates and times are said in (e.g. `America/New_York`). Default: the
    /// server's own time zone.
    pub time_zone: Option<String>,
}

impl Default for SpeechConfig {
    fn default() -> Self {
        SpeechConfig {
            voices: BTreeMap::from([
                ("en".to_owned(), "en-us".to_owned()),
                ("es".to_owned(), "es-419".to_owned()),
            ]),
            cache_entries: 256,
            library: PathBuf::from(LIBRARY),
            timeout_ms: 3000,
            queue: 32,
            max_chars: 1000,
            enabled: true,
            time_zone: None,
        }
    }
}

impl SpeechConfig {
    /// The time zone dates are said in, checked (`ivr311 check --config`).
    pub fn zone(&self) -> Result<jiff::tz::TimeZone, SpeechError> {
        match &self.time_zone {
            None => Ok(jiff::tz::TimeZone::system()),
            Some(name) => jiff::tz::TimeZone::get(name)
                .map_err(|_| SpeechError::TimeZone { name: name.clone() }),
        }
    }
}

/// The library's soname (Debian package `libespeak-ng1`).
pub const LIBRARY: &str = "libespeak-ng.so.1";

/// Why speech is not available, or one text could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    /// The library could not be opened, or lacks a function.
    #[error("cannot load {}: {source}", library.display())]
    Load {
        library: PathBuf,
        source: libloading::Error,
    },
    /// `espeak_Initialize` failed (no espeak-ng-data?).
    #[error("espeak-ng did not initialise (code {code})")]
    Initialise { code: i32 },
    /// `espeak_SetVoiceByName` refused the voice.
    #[error("espeak-ng has no voice {voice:?} (code {code})")]
    Voice { voice: String, code: i32 },
    /// `espeak_Synth` failed.
    #[error("espeak-ng synthesis failed (code {code})")]
    Synth { code: i32 },
    /// The text made no sound.
    #[error("espeak-ng rendered no audio")]
    Empty,
    /// The resampler failed.
    #[error("{0}")]
    Resample(#[from] crate::media::prompt::PromptError),
    /// `speech.time_zone` is not a known IANA time zone.
    #[error("speech.time_zone: unknown time zone {name:?}")]
    TimeZone { name: String },
}

// ---- the C interface (espeak-ng/speak_lib.h) ---------------------------------------------

/// `AUDIO_OUTPUT_SYNCHRONOUS`: `espeak_Synth` returns when the text is rendered, through the
/// callback, on the calling thread.
const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
/// `POS_CHARACTER`.
const POS_CHARACTER: c_int = 1;
/// `espeakCHARS_UTF8`.
const CHARS_UTF8: c_uint = 1;
/// `espeakENDPAUSE`: a short pause at the end of the text.
const ENDPAUSE: c_uint = 0x1000;

type SynthCallback = unsafe extern "C" fn(*mut i16, c_int, *mut c_void) -> c_int;
type InitializeFn = unsafe extern "C" fn(c_int, c_int, *const c_char, c_int) -> c_int;
type SetSynthCallbackFn = unsafe extern "C" fn(SynthCallback);
type SetVoiceByNameFn = unsafe extern "C" fn(*const c_char) -> c_int;
type SynthFn = unsafe extern "C" fn(
    *const c_void,
    usize,
    c_uint,
    c_int,
    c_uint,
    c_uint,
    *mut c_uint,
    *mut c_void,
) -> c_int;
type SynchronizeFn = unsafe extern "C" fn() -> c_int;
type TerminateFn = unsafe extern "C" fn() -> c_int;

thread_local! {
    /// The samples of the text being rendered (the callback runs on the speech thread).
    static SAMPLES: std::cell::RefCell<Vec<i16>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Samples one text may make at most (set per engine from its sample rate).
    static LIMIT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// espeak-ng's synthesis callback: collects the samples; returns 1 (stop) past the limit.
unsafe extern "C" fn collect(wav: *mut i16, n: c_int, _events: *mut c_void) -> c_int {
    if wav.is_null() || n <= 0 {
        return 0;
    }
    // SAFETY: espeak-ng hands `n` valid samples at `wav` for the duration of the call.
    let chunk = unsafe { std::slice::from_raw_parts(wav, n as usize) };
    let limit = LIMIT.with(|l| l.get());
    SAMPLES.with(|s| {
        let mut s = s.borrow_mut();
        let room = limit.saturating_sub(s.len());
        s.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if s.len() >= limit {
            1
        } else {
            0
        }
    })
}

/// The loaded library, initialised. Lives on the speech thread only.
struct Engine {
    rate: u32,
    set_voice: SetVoiceByNameFn,
    synth: SynthFn,
    synchronize: SynchronizeFn,
    terminate: TerminateFn,
    voice: Option<String>,
    // Last: the functions above point into it.
    _lib: libloading::Library,
}

impl Engine {
    fn load(library: &std::path::Path) -> Result<Engine, SpeechError> {
        let err = |source| SpeechError::Load {
            library: library.to_owned(),
            source,
        };
        // SAFETY: opening espeak-ng runs its initialisers, which have no preconditions; each
        // symbol below is looked up with the signature speak_lib.h declares for it.
        unsafe {
            let lib = libloading::Library::new(library).map_err(err)?;
            let initialize = *lib
                .get::<InitializeFn>(b"espeak_Initialize\0")
                .map_err(err)?;
            let set_callback = *lib
                .get::<SetSynthCallbackFn>(b"espeak_SetSynthCallback\0")
                .map_err(err)?;
            let set_voice = *lib
                .get::<SetVoiceByNameFn>(b"espeak_SetVoiceByName\0")
                .map_err(err)?;
            let synth = *lib.get::<SynthFn>(b"espeak_Synth\0").map_err(err)?;
            let synchronize = *lib
                .get::<SynchronizeFn>(b"espeak_Synchronize\0")
                .map_err(err)?;
            let terminate = *lib.get::<TerminateFn>(b"espeak_Terminate\0").map_err(err)?;
            // Buffer length 0: the library's default (200 ms per callback); default data path.
            let rate = initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, std::ptr::null(), 0);
            if rate <= 0 {
                return Err(SpeechError::Initialise { code: rate });
            }
            set_callback(collect);
            Ok(Engine {
                rate: rate as u32,
                set_voice,
                synth,
                synchronize,
                terminate,
                voice: None,
                _lib: lib,
            })
        }
    }

    /// Renders `text` with `voice`: samples at `self.rate`.
    fn render(&mut self, voice: &str, text: &str) -> Result<Vec<i16>, SpeechError> {
        if self.voice.as_deref() != Some(voice) {
            let name = CString::new(voice).map_err(|_| SpeechError::Voice {
                voice: voice.to_owned(),
                code: -1,
            })?;
            // SAFETY: a NUL-terminated string that outlives the call.
            let code = unsafe { (self.set_voice)(name.as_ptr()) };
            if code != 0 {
                self.voice = None;
                return Err(SpeechError::Voice {
                    voice: voice.to_owned(),
                    code,
                });
            }
            self.voice = Some(voice.to_owned());
        }
        let text = CString::new(text.replace('\0', " ")).unwrap_or_default();
        let bytes = text.as_bytes_with_nul();
        SAMPLES.with(|s| s.borrow_mut().clear());
        LIMIT.with(|l| l.set(self.rate as usize * MAX_SECONDS));
        // SAFETY: `text` is NUL-terminated UTF-8 and outlives the call; synchronous mode
        // calls `collect` on this thread before returning; no unique id or user data.
        let code = unsafe {
            (self.synth)(
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                POS_CHARACTER,
                0,
                CHARS_UTF8 | ENDPAUSE,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        // SAFETY: no arguments; waits for the (already finished) synchronous synthesis.
        unsafe { (self.synchronize)() };
        let samples = SAMPLES.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if code != 0 {
            return Err(SpeechError::Synth { code });
        }
        Ok(samples)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: the library is still loaded (`_lib` drops after this).
        unsafe { (self.terminate)() };
    }
}

// ---- the service ------------------------------------------------------------------------

/// One text to render, and where the answer goes.
struct Job {
    library: Arc<PathBuf>,
    lang: String,
    voice: String,
    text: String,
    cache: Arc<Mutex<Cache>>,
    reply: oneshot::Sender<Option<Arc<Prompt>>>,
    /// Holds the server's place in the queue until the job is done or dropped.
    _place: Place,
}

/// What the speech thread is asked.
enum Msg {
    /// Open this library now (at a server's start), so that its failure is logged then.
    Load(Arc<PathBuf>),
    Render(Job),
}

/// One of a server's `speech.queue` places; given back when dropped.
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Jobs the process's speech thread holds at most, across every server in the process (each
/// also keeps to its own `speech.queue`).
const PROCESS_QUEUE: usize = 1024;

/// The process's one speech thread (espeak-ng has process-wide state, so every server of a
/// process, as in the tests, shares it), started on first use; `None` if it cannot be started.
/// It lives as long as the process: it holds no resource but the library and its queue.
fn service() -> Option<&'static std::sync::mpsc::SyncSender<Msg>> {
    static SERVICE: OnceLock<Option<std::sync::mpsc::SyncSender<Msg>>> = OnceLock::new();
    SERVICE
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(PROCESS_QUEUE);
            match std::thread::Builder::new()
                .name("ivr311-speech".into())
                .spawn(move || speech_thread(rx))
            {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "speech thread not started; recorded words only");
                    None
                }
            }
        })
        .as_ref()
}

/// Speech for the whole server: cheap to clone, shared by every call.
#[derive(Clone)]
pub struct Speech {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Speech {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speech")
            .field("available", &self.inner.tx.is_some())
            .finish()
    }
}

struct Inner {
    /// The process's speech thread, when speech is on.
    tx: Option<&'static std::sync::mpsc::SyncSender<Msg>>,
    library: Arc<PathBuf>,
    /// Jobs of this server queued or in synthesis, at most `queue`.
    in_flight: Arc<AtomicUsize>,
    queue: usize,
    voices: BTreeMap<String, String>,
    timeout: Duration,
    max_chars: usize,
    zone: jiff::tz::TimeZone,
    cache: Arc<Mutex<Cache>>,
}

impl Speech {
    /// Speech for one server: the library is opened on the speech thread now (a failure is
    /// logged once, and every render then answers `None`). With `enabled: false` or no voices
    /// every render answers `None`.
    pub fn start(config: &SpeechConfig) -> Speech {
        let cache = Arc::new(Mutex::new(Cache::new(config.cache_entries)));
        let zone = config.zone().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "dates are said in UTC");
            jiff::tz::TimeZone::UTC
        });
        let library = Arc::new(config.library.clone());
        let tx = if config.enabled && !config.voices.is_empty() {
            let tx = service();
            if let Some(tx) = tx {
                let _ = tx.try_send(Msg::Load(library.clone()));
            }
            tx
        } else {
            tracing::info!("speech off; recorded words only");
            None
        };
        Speech {
            inner: Arc::new(Inner {
                tx,
                library,
                in_flight: Arc::new(AtomicUsize::new(0)),
                queue: config.queue.max(1),
                voices: config.voices.clone(),
                timeout: Duration::from_millis(config.timeout_ms),
                max_chars: config.max_chars,
                zone,
                cache,
            }),
        }
    }

    /// Speech that is off: every render answers `None` (for tests and tools).
    pub fn off() -> Speech {
        Speech::start(&SpeechConfig {
            enabled: false,
            ..SpeechConfig::default()
        })
    }

    /// The time zone dates and times are said in.
    pub fn zone(&self) -> &jiff::tz::TimeZone {
        &self.inner.zone
    }

    /// `text` spoken in `lang` (a menu language, `en`, `es`, `es-MX` ...) as an 8 kHz prompt,
    /// or `None` when it cannot be (no voice for the language, speech unavailable, the queue
    /// full, the time limit passed, synthesis failed: each logged). Never blocks the caller's
    /// thread; cached by (language, text).
    pub fn render(
        &self,
        lang: &str,
        text: &str,
    ) -> impl std::future::Future<Output = Option<Arc<Prompt>>> + Send + 'static {
        self.render_with(lang, text, self.inner.timeout, self.inner.max_chars)
    }

    /// [`Speech::render`] with its own time limit and length: an announcement is rendered
    /// once, off every call, and may be longer than what a call waits for.
    fn render_with(
        &self,
        lang: &str,
        text: &str,
        timeout: Duration,
        max_chars: usize,
    ) -> impl std::future::Future<Output = Option<Arc<Prompt>>> + Send + 'static {
        let inner = self.inner.clone();
        let text = clean(text, max_chars);
        let voice = voice_for(&self.inner.voices, lang);
        let lang = lang.to_owned();
        async move {
            if text.is_empty() {
                return None;
            }
            let Some(voice) = voice else {
                tracing::debug!(language = %lang, "no voice for this language; not spoken");
                return None;
            };
            let key = (lang.clone(), text.clone());
            if let Some(p) = inner.cache.lock().ok()?.get(&key) {
                return Some(p);
            }
            let tx = inner.tx?;
            let chars = text.chars().count();
            if inner.in_flight.fetch_add(1, Ordering::Relaxed) >= inner.queue {
                inner.in_flight.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(chars, "speech queue full; saying recorded words instead");
                return None;
            }
            let place = Place(inner.in_flight.clone());
            let (reply, answer) = oneshot::channel();
            let job = Job {
                library: inner.library.clone(),
                lang,
                voice,
                text,
                cache: inner.cache.clone(),
                reply,
                _place: place,
            };
            if let Err(e) = tx.try_send(Msg::Render(job)) {
                match e {
                    std::sync::mpsc::TrySendError::Full(_) => {
                        tracing::warn!(chars, "speech queue full; saying recorded words instead")
                    }
                    std::sync::mpsc::TrySendError::Disconnected(_) => {
                        tracing::debug!(chars, "speech unavailable; recorded words instead")
                    }
                }
                return None;
            }
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => None,
                Err(_) => {
                    tracing::warn!(
                        chars,
                        timeout_ms = timeout.as_millis() as u64,
                        "speech took too long; saying recorded words instead"
                    );
                    None
                }
            }
        }
    }
}

/// How long an announcement's text may take to render (once, when it is posted or loaded).
const ANNOUNCEMENT_RENDER_TIMEOUT: Duration = Duration::from_secs(60);

/// The announcement board's speech ([`crate::dispatch::announcements`]): it renders each
/// message once, on a blocking thread, and waits for the speech thread there.
impl crate::media::speech::Speech for Speech {
    fn available(&self) -> bool {
        self.inner.tx.is_some()
    }

    fn render(&self, lang: &str, name: &str, text: &str) -> Option<Prompt> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let rendered = handle.block_on(self.render_with(
            lang,
            text,
            ANNOUNCEMENT_RENDER_TIMEOUT,
            crate::dispatch::announcements::MAX_TEXT,
        ))?;
        let mut p = (*rendered).clone();
        p.name = name.to_owned();
        Some(p)
    }
}

/// The voice for `lang`: its own entry, else its base language's (`es-MX` → `es`).
fn voice_for(voices: &BTreeMap<String, String>, lang: &str) -> Option<String> {
    voices
        .get(lang)
        .or_else(|| voices.get(lang.split(['-', '_']).next().unwrap_or(lang)))
        .cloned()
}

/// Control characters become spaces, runs of white space one space, at most `max` characters.
fn clean(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    let mut n = 0;
    for word in text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
    {
        for c in (!out.is_empty())
            .then_some(' ')
            .into_iter()
            .chain(word.chars())
        {
            if n == max {
                return out;
            }
            out.push(c);
            n += 1;
        }
    }
    out
}

/// The speech thread: opens each library asked for once (remembering a failure, logged once),
/// and renders jobs one at a time.
fn speech_thread(rx: std::sync::mpsc::Receiver<Msg>) {
    let mut engines: HashMap<PathBuf, Option<Engine>> = HashMap::new();
    fn open<'a>(
        engines: &'a mut HashMap<PathBuf, Option<Engine>>,
        library: &std::path::Path,
    ) -> Option<&'a mut Engine> {
        let e = engines.entry(library.to_owned()).or_insert_with(|| match Engine::load(library) {
            Ok(e) => {
                tracing::info!(library = %library.display(), rate = e.rate, "espeak-ng loaded; dynamic text is spoken");
                Some(e)
            }
            Err(e) => {
                tracing::warn!(error = %e, "speech unavailable; dynamic text falls back to recorded words");
                None
            }
        });
        e.as_mut()
    }
    while let Ok(msg) = rx.recv() {
        let job = match msg {
            Msg::Load(library) => {
                open(&mut engines, &library);
                continue;
            }
            Msg::Render(job) => job,
        };
        if job.reply.is_closed() {
            continue;
        }
        let Some(engine) = open(&mut engines, &job.library) else {
            continue;
        };
        let chars = job.text.chars().count();
        let started = std::time::Instant::now();
        let rendered = engine
            .render(&job.voice, &job.text)
            .and_then(|pcm| to_prompt(&pcm, engine.rate));
        let prompt = match rendered {
            Ok(p) => {
                tracing::debug!(
                    language = %job.lang,
                    chars,
                    seconds = p.pcm().len() as f64 / 8000.0,
                    took_ms = started.elapsed().as_millis() as u64,
                    "text spoken"
                );
                let p = Arc::new(p);
                if let Ok(mut c) = job.cache.lock() {
                    c.put((job.lang, job.text), p.clone());
                }
                Some(p)
            }
            Err(e) => {
                tracing::warn!(error = %e, language = %job.lang, chars, "speech failed; saying recorded words instead");
                None
            }
        };
        let _ = job.reply.send(prompt);
    }
}

/// espeak's samples at `rate` as an 8 kHz prompt, through the prompts' anti-aliased
/// resampler; leading and trailing silence trimmed to 100 ms.
fn to_prompt(pcm: &[i16], rate: u32) -> Result<Prompt, SpeechError> {
    const QUIET: i16 = 64;
    let keep = rate as usize / 10;
    let first = pcm.iter().position(|s| s.unsigned_abs() > QUIET as u16);
    let last = pcm.iter().rposition(|s| s.unsigned_abs() > QUIET as u16);
    let (Some(first), Some(last)) = (first, last) else {
        return Err(SpeechError::Empty);
    };
    let span = &pcm[first.saturating_sub(keep)..(last + keep + 1).min(pcm.len())];
    Ok(Prompt::from_samples("speech", span, rate)?)
}

/// Rendered prompts by (language, text), least recently used dropped first.
struct Cache {
    cap: usize,
    map: HashMap<(String, String), (u64, Arc<Prompt>)>,
    order: VecDeque<(u64, (String, String))>,
    tick: u64,
}

impl Cache {
    fn new(cap: usize) -> Cache {
        Cache {
            cap,
            map: HashMap::new(),
            order: VecDeque::new(),
            tick: 0,
        }
    }

    fn get(&mut self, key: &(String, String)) -> Option<Arc<Prompt>> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.map.get_mut(key)?;
        e.0 = tick;
        let p = e.1.clone();
        self.order.push_back((tick, key.clone()));
        self.compact();
        Some(p)
    }

    fn put(&mut self, key: (String, String), p: Arc<Prompt>) {
        if self.cap == 0 {
            return;
        }
        self.tick += 1;
        self.map.insert(key.clone(), (self.tick, p));
        self.order.push_back((self.tick, key));
        while self.map.len() > self.cap {
            let Some((tick, k)) = self.order.pop_front() else {
                break;
            };
            // Only the newest mark of a key counts; older ones are stale.
            if self.map.get(&k).is_some_and(|e| e.0 == tick) {
                self.map.remove(&k);
            }
        }
        self.compact();
    }

    /// Drops stale marks when they outnumber the entries (keeps `order` bounded).
    fn compact(&mut self) {
        if self.order.len() > 2 * self.cap.max(8) {
            let map = &self.map;
            self.order
                .retain(|(t, k)| map.get(k).is_some_and(|e| e.0 == *t));
        }
    }
}

// ---- dates and times ----------------------------------------------------------------------

const MONTHS_EN: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const MONTHS_ES: [&str; 12] = [
    "enero",
    "febrero",
    "marzo",
    "abril",
    "mayo",
    "junio",
    "julio",
    "agosto",
    "septiembre",
    "octubre",
    "noviembre",
    "diciembre",
];
const ORDINALS_EN: [&str; 31] = [
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh",
    "twelfth",
    "thirteenth",
    "fourteenth",
    "fifteenth",
    "sixteenth",
    "seventeenth",
    "eighteenth",
    "nineteenth",
    "twentieth",
    "twenty-first",
    "twenty-second",
    "twenty-third",
    "twenty-fourth",
    "twenty-fifth",
    "twenty-sixth",
    "twenty-seventh",
    "twenty-eighth",
    "twenty-ninth",
    "thirtieth",
    "thirty-first",
];

/// "Filed on December third, at 2:15 PM." / "Presentada el 3 de diciembre, a las 14:15." for
/// a request filed at `at`, said in `zone`; a year other than `today`'s is said too. English
/// ordinals are written out (espeak reads "3" as "three"); Spanish says the day as a cardinal
/// ("el tres de diciembre") except the first ("el primero").
pub fn filed_on(
    lang: &str,
    at: jiff::Timestamp,
    today: jiff::Timestamp,
    zone: &jiff::tz::TimeZone,
) -> String {
    let local = at.to_zoned_datetime(zone.clone());
    let this_year = today.to_zoned_datetime(zone.clone()).year();
    let (month, day, year) = (
        local.month() as usize - 1,
        local.day() as usize,
        local.year(),
    );
    let (hour, minute) = (local.hour(), local.minute());
    if lang == "es" || lang.starts_with("es-") || lang.starts_with("es_") {
        let day = if day == 1 {
            "primero".to_owned()
        } else {
            day.to_string()
        };
        let year = if year != this_year {
            format!(" de {year}")
        } else {
            String::new()
        };
        format!(
            "Presentada el {day} de {}{year}, a las {hour}:{minute:02}.",
            MONTHS_ES[month]
        )
    } else {
        let year = if year != this_year {
            format!(", {year}")
        } else {
            String::new()
        };
        let (h12, half) = match hour {
            0 => (12, "AM"),
            1..=11 => (hour, "AM"),
            12 => (12, "PM"),
            _ => (hour - 12, "PM"),
        };
        let time = if minute == 0 {
            format!("{h12} {half}")
        } else {
            format!("{h12}:{minute:02} {half}")
        };
        format!(
            "Filed on {} {}{year}, at {time}.",
            MONTHS_EN[month],
            ORDINALS_EN[day - 1]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn dates_are_said_in_each_language() {
        let ny = jiff::tz::TimeZone::get("America/New_York").unwrap();
        let at = ts("2026-12-03T19:15:00Z");
        let today = ts("2026-12-07T12:00:00Z");
        assert_eq!(
            filed_on("en", at, today, &ny),
            "Filed on December third, at 2:15 PM."
        );
        assert_eq!(
            filed_on("es", at, today, &ny),
            "Presentada el 3 de diciembre, a las 14:15."
        );
        // Local date, not UTC's: 02:00 UTC on the 1st is still November 30th in New York.
        let at = ts("2025-12-01T02:00:00Z");
        assert_eq!(
            filed_on("en", at, today, &ny),
            "Filed on November thirtieth, 2025, at 9 PM."
        );
        let at = ts("2026-05-01T16:05:00Z");
        assert_eq!(
            filed_on("es-MX", at, today, &ny),
            "Presentada el primero de mayo, a las 12:05."
        );
    }

    #[test]
    fn text_is_cleaned_and_cut() {
        assert_eq!(clean("  Crew\n\t7 \u{7} sent ", 100), "Crew 7 sent");
        assert_eq!(clean("abcdef", 3), "abc");
        assert_eq!(clean("ab cd", 4), "ab c");
        assert_eq!(clean("", 4), "");
    }

    #[test]
    fn voices_fall_back_to_the_base_language() {
        let v = SpeechConfig::default().voices;
        assert_eq!(voice_for(&v, "es-MX").as_deref(), Some("es-419"));
        assert_eq!(voice_for(&v, "en").as_deref(), Some("en-us"));
        assert_eq!(voice_for(&v, "fr"), None);
    }

    #[test]
    fn cache_drops_the_least_recently_used() {
        let p = |n: &str| Arc::new(Prompt::from_samples(n, &[1000; 800], 8000).unwrap());
        let k = |s: &str| ("en".to_owned(), s.to_owned());
        let mut c = Cache::new(2);
        c.put(k("a"), p("a"));
        c.put(k("b"), p("b"));
        assert!(c.get(&k("a")).is_some());
        c.put(k("c"), p("c"));
        assert!(c.get(&k("b")).is_none(), "b was the least recently used");
        assert!(c.get(&k("a")).is_some());
        assert!(c.get(&k("c")).is_some());
        for i in 0..100 {
            c.get(&k("a"));
            c.put(k(&i.to_string()), p("x"));
        }
        assert!(c.map.len() <= 2 && c.order.len() <= 2 * 8 + 1);
    }

    #[tokio::test]
    async fn a_missing_library_answers_none() {
        let speech = Speech::start(&SpeechConfig {
            library: "/nonexistent/libespeak-ng.so.1".into(),
            ..SpeechConfig::default()
        });
        assert!(speech.render("en", "hello").await.is_none());
        assert!(Speech::off().render("en", "hello").await.is_none());
    }
}
