//! The seam between text that must be spoken (an emergency announcement typed by an admin)
//! and whatever turns text into audio.
//!
//! [`Speech::render`] is called off the call loops (the announcement board renders each
//! message once, on a blocking thread, when it is posted or loaded), never while a call waits
//! on it. The server's espeak-ng speech ([`crate::media::tts::Speech`]) implements it; a
//! server with speech off is like [`NoSpeech`]: text then cannot be heard, so the
//! admin API refuses a message in a language that has text but no WAV, and a stored message
//! that still cannot be rendered is heard as the recorded `announcement_fallback` prompt ("There
//! is an important announcement from the city. Please visit the city's website for details.").

use crate::media::prompt::Prompt;

/// Renders text as a prompt (8 kHz mono), or `None` if it cannot.
pub trait Speech: Send + Sync + 'static {
    /// Whether this server can speak at all (the admin API accepts text-only messages).
    fn available(&self) -> bool;
    /// `text` spoken in `lang` (a menu language code such as `en`), named `name`.
    fn render(&self, lang: &str, name: &str, text: &str) -> Option<Prompt>;
}

/// No synthesis: nothing can be spoken.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSpeech;

impl Speech for NoSpeech {
    fn available(&self) -> bool {
        false
    }

    fn render(&self, _lang: &str, _name: &str, _text: &str) -> Option<Prompt> {
        None
    }
}
