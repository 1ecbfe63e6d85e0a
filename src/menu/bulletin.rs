//! What the menu engine knows of the city's emergency announcements: when each one is heard,
//! and the temporary main-menu keys it adds while it lasts.
//!
//! Ground floor, like the engine: plain data. The announcements themselves (their audio, the
//! database, the admin API) live in [`crate::dispatch::announcements`]; the engine names their
//! audio with [`message_prompt`] and [`entry_prompt`], and the call resolves those names to the
//! audio the announcement carries.

use crate::menu::schema::TicketAction;
use jiff::Timestamp;

/// The prefix of the prompt names that stand for announcement audio.
pub const PROMPT_PREFIX: &str = "announcement:";

/// One announcement, as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bulletin {
    pub id: i64,
    /// Heard from this instant...
    pub starts_at: Timestamp,
    /// ...until this one (exclusive).
    pub ends_at: Timestamp,
    /// Temporary keys in the main menu while it lasts.
    pub entries: Vec<TempEntry>,
}

impl Bulletin {
    /// Whether it is heard at `at`.
    pub fn active(&self, at: Timestamp) -> bool {
        self.starts_at <= at && at < self.ends_at
    }
}

/// A key the main menu takes while an announcement lasts.
#[derive(Debug, Clone, PartialEq)]
pub struct TempEntry {
    pub key: char,
    pub action: TempAction,
}

/// What a temporary key does.
#[derive(Debug, Clone, PartialEq)]
pub enum TempAction {
    /// File a request of this (temporary) service, with the menu's default steps.
    Ticket(Box<TicketAction>),
    /// Play the entry's information message, then come back to the main menu.
    Info,
}

/// The prompt name of announcement `id`'s message.
pub fn message_prompt(id: i64) -> String {
    format!("{PROMPT_PREFIX}{id}")
}

/// The prompt name of the information message of announcement `id`'s key `key`.
pub fn entry_prompt(id: i64, key: char) -> String {
    format!("{PROMPT_PREFIX}{id}:{key}")
}
