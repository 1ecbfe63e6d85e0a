//! Emergency announcements: a message the whole city must hear (a water main break, a
//! snowstorm, a boil-water notice), set by admins through `POST /admin/announcements`
//! without editing the menu, and heard by every caller right after the 911 screening while
//! it lasts.
//!
//! - **Stored** in the `announcements` table (so they survive restarts and every node sharing
//!   the database plays them); each node's [`Board`] reloads them when one is set or ended
//!   through it and every [`REFRESH`] otherwise.
//! - **Audio**: per language, an uploaded WAV (any rate, mono or stereo, converted as the
//!   prompts are), else the text rendered by the server's [`Speech`]. A server without
//!   synthesis refuses text without a WAV when the announcement is posted; a stored text that
//!   cannot be rendered is heard as the recorded `announcement_fallback` prompt.
//! - **Temporary keys** in the main menu while it lasts: a ticket service (also listed in the
//!   public Open311 `services` meanwhile) or an information message. A key may not be the
//!   emergency key, the repeat or back key, a key the main menu uses, or a key the screening
//!   menu sends to 911 or a crisis line.
//!
//! The menu engine sees them as [`Bulletin`]s and decides by its own clock whether each one is
//! active; the call resolves the prompt names of their audio through [`Snapshot::prompt`].

use crate::dispatch::db;
use crate::media::prompt::Prompt;
use crate::media::speech::Speech;
use crate::menu::bulletin::{self, Bulletin, TempAction, TempEntry};
use crate::menu::schedule::WallClock;
use crate::menu::schema::{Action, MenuFile, TicketAction};
use base64::Engine as _;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often a node reloads the announcements from the database (others may have changed
/// them).
pub const REFRESH: Duration = Duration::from_secs(30);
/// Announcements active or scheduled at once, at most.
pub const MAX_ANNOUNCEMENTS: usize = 20;
/// Temporary keys per announcement, at most.
pub const MAX_ENTRIES: usize = 5;
/// Longest text, in characters.
pub const MAX_TEXT: usize = 2000;
/// Longest an announcement may last.
pub const MAX_DAYS: i64 = 31;
/// Largest decoded WAV, in bytes.
pub const MAX_WAV_BYTES: usize = 8 << 20;

/// A message in one language: a WAV (base64), or text to be spoken, or both (the WAV plays).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Message {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The WAV file, base64 (standard alphabet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wav_base64: Option<String>,
}

/// A temporary ticket service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TempService {
    /// Open311 `service_code`: a-z, 0-9 and `_`, not one the menu has.
    pub service: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Open311 `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// A temporary main-menu key: exactly one of `ticket` and `info`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<TempService>,
    /// The information message per language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<BTreeMap<String, Message>>,
}

/// The body of `POST /admin/announcements`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnnouncementSpec {
    /// The message per language (`en`, `es`: languages the menu has).
    pub messages: BTreeMap<String, Message>,
    /// RFC 3339 (`2026-12-07T15:00:00Z`).
    pub starts_at: String,
    pub ends_at: String,
    #[serde(default)]
    pub entries: Vec<EntrySpec>,
}

/// A stored announcement.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub id: i64,
    pub created_at: Timestamp,
    pub created_by: String,
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub spec: AnnouncementSpec,
}

impl Announcement {
    /// When it stops being heard: its end, or when an admin ended it.
    pub fn until(&self) -> Timestamp {
        self.ended_at.map_or(self.ends_at, |e| e.min(self.ends_at))
    }

    /// What the engine needs of it.
    fn bulletin(&self) -> Bulletin {
        Bulletin {
            id: self.id,
            starts_at: self.starts_at,
            ends_at: self.until(),
            entries: (self.spec.entries.iter())
                .filter_map(|e| {
                    let key = e.key.chars().next()?;
                    let action = match &e.ticket {
                        Some(t) => TempAction::Ticket(Box::new(t.action())),
                        None => TempAction::Info,
                    };
                    Some(TempEntry { key, action })
                })
                .collect(),
        }
    }

    /// The public view (no audio).
    pub fn view(&self, now: Timestamp) -> serde_json::Value {
        let state = if self.ended_at.is_some_and(|e| e <= now) || self.ends_at <= now {
            "ended"
        } else if self.starts_at > now {
            "scheduled"
        } else {
            "active"
        };
        let messages: BTreeMap<&String, serde_json::Value> = (self.spec.messages.iter())
            .map(|(lang, m)| {
                (
                    lang,
                    serde_json::json!({"text": m.text, "wav": m.wav_base64.is_some()}),
                )
            })
            .collect();
        let entries: Vec<serde_json::Value> = (self.spec.entries.iter())
            .map(|e| match &e.ticket {
                Some(t) => serde_json::json!({"key": e.key, "ticket": t}),
                None => serde_json::json!({
                    "key": e.key,
                    "info": e.info.as_ref().map(|m| m.keys().collect::<Vec<_>>()),
                }),
            })
            .collect();
        serde_json::json!({
            "id": self.id,
            "state": state,
            "created_at": self.created_at.to_string(),
            "created_by": self.created_by,
            "starts_at": self.starts_at.to_string(),
            "ends_at": self.ends_at.to_string(),
            "ended_at": self.ended_at.map(|t| t.to_string()),
            "messages": messages,
            "entries": entries,
        })
    }
}

impl TempService {
    fn action(&self) -> TicketAction {
        TicketAction {
            service: self.service.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            agency: None,
            keywords: vec![],
            steps: None,
            house_number: false,
            duplicates: None,
        }
    }
}

/// Why an announcement was not stored or read.
#[derive(Debug, thiserror::Error)]
pub enum AnnouncementError {
    /// The request is not acceptable; every problem, one per line.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The database failed.
    #[error("announcements store: {0}")]
    Store(#[from] sqlx::Error),
    /// A stored row could not be read back.
    #[error("announcement {id}: bad stored {what}")]
    BadRow { id: i64, what: &'static str },
}

/// A validated request, ready to store.
#[derive(Debug, Clone)]
pub struct Valid {
    pub spec: AnnouncementSpec,
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
}

/// Checks `spec` against the menu in service (its main menu `main` and the service codes it
/// files, `menu_services`), the announcements already set (`others`) and the time `now`.
pub fn validate(
    spec: AnnouncementSpec,
    menu: &MenuFile,
    main: &str,
    menu_services: &[String],
    others: &[Announcement],
    can_speak: bool,
    now: Timestamp,
) -> Result<Valid, AnnouncementError> {
    let mut errs = Vec::new();
    let time = |what: &str, s: &str, errs: &mut Vec<String>| match s.parse::<Timestamp>() {
        Ok(t) => Some(t),
        Err(e) => {
            errs.push(format!("{what} {s:?} is not an RFC 3339 time: {e}"));
            None
        }
    };
    let starts_at = time("starts_at", &spec.starts_at, &mut errs);
    let ends_at = time("ends_at", &spec.ends_at, &mut errs);
    if let (Some(s), Some(e)) = (starts_at, ends_at) {
        if e <= s {
            errs.push("ends_at must be after starts_at".into());
        } else if e <= now {
            errs.push("ends_at is already past".into());
        } else if e.duration_since(s) > jiff::SignedDuration::from_hours(24 * MAX_DAYS) {
            errs.push(format!("an announcement lasts at most {MAX_DAYS} days"));
        }
    }
    let live = others.iter().filter(|a| a.until() > now).count();
    if live >= MAX_ANNOUNCEMENTS {
        errs.push(format!(
            "{MAX_ANNOUNCEMENTS} announcements are set already: end one first"
        ));
    }
    check_messages("messages", &spec.messages, menu, can_speak, &mut errs);
    if spec.entries.len() > MAX_ENTRIES {
        errs.push(format!("at most {MAX_ENTRIES} entries"));
    }
    let refused = refused_keys(menu, main);
    let mut seen = Vec::new();
    for (i, e) in spec.entries.iter().enumerate() {
        let at = format!("entries[{i}]");
        let mut chars = e.key.chars();
        let key = match (chars.next(), chars.next()) {
            (Some(k), None) if k.is_ascii_digit() || k == '*' || k == '#' => k,
            _ => {
                errs.push(format!("{at}.key {:?} must be one keypad key", e.key));
                continue;
            }
        };
        if let Some(why) = refused.get(&key) {
            errs.push(format!("{at}.key {key:?} is refused: {why}"));
        }
        if seen.contains(&key) {
            errs.push(format!("{at}.key {key:?} is used twice"));
        }
        seen.push(key);
        if let (Some(s), Some(t)) = (starts_at, ends_at) {
            let clash = others.iter().any(|a| {
                a.until() > now
                    && a.starts_at < t
                    && s < a.until()
                    && a.spec.entries.iter().any(|o| o.key == e.key)
            });
            if clash {
                errs.push(format!(
                    "{at}.key {key:?} is a temporary key of another announcement at that time"
                ));
            }
        }
        match (&e.ticket, &e.info) {
            (Some(t), None) => {
                let code_ok = !t.service.is_empty()
                    && t.service.len() <= 64
                    && (t.service.bytes())
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !code_ok {
                    errs.push(format!(
                        "{at}.ticket.service {:?} must be 1 to 64 of a-z, 0-9 and _",
                        t.service
                    ));
                } else if menu_services.contains(&t.service) {
                    errs.push(format!(
                        "{at}.ticket.service {:?} is a service of the menu already",
                        t.service
                    ));
                }
                if t.name.trim().is_empty() || t.name.chars().count() > 200 {
                    errs.push(format!("{at}.ticket.name must be 1 to 200 characters"));
                }
                let long =
                    |o: &Option<String>| o.as_ref().is_some_and(|d| d.chars().count() > MAX_TEXT);
                if long(&t.description) || long(&t.group) {
                    errs.push(format!("{at}.ticket: description or group too long"));
                }
            }
            (None, Some(info)) => {
                check_messages(&format!("{at}.info"), info, menu, can_speak, &mut errs)
            }
            _ => errs.push(format!("{at} needs exactly one of ticket and info")),
        }
    }
    match (starts_at, ends_at) {
        (Some(starts_at), Some(ends_at)) if errs.is_empty() => Ok(Valid {
            spec,
            starts_at,
            ends_at,
        }),
        _ => Err(AnnouncementError::Invalid(errs)),
    }
}

/// Keys a temporary entry may not take, and why.
fn refused_keys(menu: &MenuFile, main: &str) -> HashMap<char, String> {
    let d = &menu.defaults;
    let mut out = HashMap::new();
    out.insert(d.emergency_key, "it connects to 911".to_owned());
    out.insert(d.repeat_key, "it repeats the menu".to_owned());
    out.insert(d.back_key, "it goes back a menu".to_owned());
    if let Some(m) = menu.menus.get(&menu.screening) {
        for (k, a) in &m.entries {
            let crisis = match a {
                Action::Emergency(_) => Some("the screening menu sends it to 911"),
                Action::Transfer(_) => Some("the screening menu sends it to a crisis line"),
                _ => None,
            };
            if let (Some(why), Some(c)) = (crisis, k.chars().next()) {
                out.insert(c, why.to_owned());
            }
        }
    }
    if let Some(m) = menu.menus.get(main) {
        for k in m.entries.keys() {
            if let Some(c) = k.chars().next() {
                out.entry(c)
                    .or_insert_with(|| "the main menu uses it".to_owned());
            }
        }
    }
    out
}

fn check_messages(
    at: &str,
    messages: &BTreeMap<String, Message>,
    menu: &MenuFile,
    can_speak: bool,
    errs: &mut Vec<String>,
) {
    if messages.is_empty() {
        errs.push(format!("{at}: at least one language"));
    }
    for (lang, m) in messages {
        if !menu.languages.contains(lang) {
            errs.push(format!(
                "{at}.{lang}: the menu's languages are {}",
                menu.languages.join(", ")
            ));
        }
        if m.text
            .as_ref()
            .is_some_and(|t| t.chars().count() > MAX_TEXT)
        {
            errs.push(format!("{at}.{lang}.text: at most {MAX_TEXT} characters"));
        }
        match &m.wav_base64 {
            Some(b64) => {
                if let Err(e) = decode_wav(lang, b64) {
                    errs.push(format!("{at}.{lang}.wav_base64: {e}"));
                }
            }
            None if m.text.as_ref().is_some_and(|t| !t.trim().is_empty()) => {
                if !can_speak {
                    errs.push(format!(
                        "{at}.{lang}: this server cannot speak text (no speech synthesis); \
                         upload the message as a WAV (wav_base64)"
                    ));
                }
            }
            None => errs.push(format!("{at}.{lang}: needs text or wav_base64")),
        }
    }
}

/// Decodes a base64 WAV into a prompt.
fn decode_wav(name: &str, b64: &str) -> Result<Prompt, String> {
    if b64.len() > MAX_WAV_BYTES / 3 * 4 + 4 {
        return Err(format!("larger than {MAX_WAV_BYTES} bytes"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    Prompt::from_wav_bytes(name, Path::new("<upload>"), &bytes).map_err(|e| e.to_string())
}

// ---- the database ---------------------------------------------------------------------------

/// Stores a validated announcement; returns its id.
pub async fn insert(
    pool: &AnyPool,
    v: &Valid,
    who: &str,
    now: Timestamp,
) -> Result<i64, AnnouncementError> {
    let spec = serde_json::to_string(&v.spec).map_err(|_| AnnouncementError::BadRow {
        id: 0,
        what: "spec",
    })?;
    let id: i64 = sqlx::query_scalar(&db::sql(
        pool,
        "INSERT INTO announcements (created_at, created_by, starts_at, ends_at, spec) \
         VALUES (?, ?, ?, ?, ?) RETURNING id",
    ))
    .bind(now.to_string())
    .bind(who)
    .bind(v.starts_at.to_string())
    .bind(v.ends_at.to_string())
    .bind(spec)
    .fetch_one(pool)
    .await?;
    Ok(id)
}

/// Ends announcement `id` at `now`: false if there is none still running or scheduled.
pub async fn end(
    pool: &AnyPool,
    id: i64,
    who: &str,
    now: Timestamp,
) -> Result<bool, AnnouncementError> {
    let now = now.to_string();
    let r = sqlx::query(&db::sql(
        pool,
        "UPDATE announcements SET ended_at = ?, ended_by = ? \
         WHERE id = ? AND ended_at IS NULL AND ends_at > ?",
    ))
    .bind(&now)
    .bind(who)
    .bind(id)
    .bind(&now)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The announcements not over at `now` (active or scheduled), by start.
pub async fn current(
    pool: &AnyPool,
    now: Timestamp,
) -> Result<Vec<Announcement>, AnnouncementError> {
    // Times are RFC 3339 UTC, compared as instants after parsing (jiff may print fractions).
    type Row = (i64, String, String, String, String, Option<String>, String);
    let rows: Vec<Row> = sqlx::query_as(&db::sql(
        pool,
        "SELECT id, created_at, created_by, starts_at, ends_at, ended_at, spec \
             FROM announcements WHERE ended_at IS NULL ORDER BY starts_at, id",
    ))
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for (id, created_at, created_by, starts_at, ends_at, ended_at, spec) in rows {
        let ts = |s: &str, what| {
            s.parse::<Timestamp>()
                .map_err(|_| AnnouncementError::BadRow { id, what })
        };
        let a = Announcement {
            id,
            created_at: ts(&created_at, "created_at")?,
            created_by,
            starts_at: ts(&starts_at, "starts_at")?,
            ends_at: ts(&ends_at, "ends_at")?,
            ended_at: ended_at.as_deref().map(|e| ts(e, "ended_at")).transpose()?,
            spec: serde_json::from_str(&spec)
                .map_err(|_| AnnouncementError::BadRow { id, what: "spec" })?,
        };
        if a.until() > now {
            out.push(a);
        }
    }
    Ok(out)
}

// ---- what calls read ------------------------------------------------------------------------

/// The announcements as calls see them, taken once per call.
#[derive(Default)]
pub struct Snapshot {
    pub announcements: Vec<Announcement>,
    pub bulletins: Arc<Vec<Bulletin>>,
    /// Audio by (language, prompt name): see [`bulletin::message_prompt`].
    prompts: HashMap<(String, String), Arc<Prompt>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("announcements", &self.announcements.len())
            .field("prompts", &self.prompts.len())
            .finish()
    }
}

impl Snapshot {
    /// The audio named `name` in `lang`, else in `default`, else in any language it has.
    pub fn prompt(&self, lang: &str, default: &str, name: &str) -> Option<Arc<Prompt>> {
        let get = |l: &str| self.prompts.get(&(l.to_owned(), name.to_owned())).cloned();
        get(lang).or_else(|| get(default)).or_else(|| {
            (self.prompts.iter())
                .find(|((_, n), _)| n == name)
                .map(|(_, p)| p.clone())
        })
    }

    /// The temporary ticket services active at `at`: the action and its Open311 group.
    pub fn services_at(&self, at: Timestamp) -> Vec<(TicketAction, String)> {
        (self.announcements.iter())
            .filter(|a| a.starts_at <= at && at < a.until())
            .flat_map(|a| a.spec.entries.iter())
            .filter_map(|e| {
                let t = e.ticket.as_ref()?;
                Some((t.action(), t.group.clone().unwrap_or_default()))
            })
            .collect()
    }
}

/// Every announcement of one node: loaded from the database, rendered once.
pub struct Board {
    pool: AnyPool,
    speech: Arc<dyn Speech>,
    clock: WallClock,
    current: RwLock<Arc<Snapshot>>,
}

impl Board {
    pub fn new(pool: AnyPool, speech: Arc<dyn Speech>, clock: WallClock) -> Board {
        Board {
            pool,
            speech,
            clock,
            current: RwLock::new(Arc::default()),
        }
    }

    /// The announcements now (cheap: an `Arc`).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn can_speak(&self) -> bool {
        self.speech.available()
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Reloads from the database, rendering the audio of announcements not seen before.
    pub async fn refresh(&self) -> Result<(), AnnouncementError> {
        let rows = current(&self.pool, self.now()).await?;
        let old = self.snapshot();
        let speech = self.speech.clone();
        let snap = tokio::task::spawn_blocking(move || render(rows, &old, speech.as_ref()))
            .await
            .map_err(|_| AnnouncementError::BadRow {
                id: 0,
                what: "audio (renderer stopped)",
            })?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        Ok(())
    }

    /// Reloads every [`REFRESH`] until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(REFRESH) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "announcements could not be reloaded; the ones loaded stay");
            }
        }
    }
}

/// A snapshot of `rows`, reusing the audio `old` has for the same announcements.
fn render(rows: Vec<Announcement>, old: &Snapshot, speech: &dyn Speech) -> Snapshot {
    let mut prompts = HashMap::new();
    for a in &rows {
        let mut parts: Vec<(String, &BTreeMap<String, Message>)> =
            vec![(bulletin::message_prompt(a.id), &a.spec.messages)];
        for e in &a.spec.entries {
            if let (Some(info), Some(k)) = (&e.info, e.key.chars().next()) {
                parts.push((bulletin::entry_prompt(a.id, k), info));
            }
        }
        for (name, messages) in parts {
            for (lang, m) in messages {
                let key = (lang.clone(), name.clone());
                if let Some(p) = old.prompts.get(&key) {
                    prompts.insert(key, p.clone());
                    continue;
                }
                let p = match (&m.wav_base64, &m.text) {
                    (Some(b64), _) => decode_wav(&name, b64)
                        .map_err(|e| tracing::warn!(id = a.id, %lang, error = %e, "announcement audio unreadable"))
                        .ok(),
                    (None, Some(text)) => speech.render(lang, &name, text),
                    (None, None) => None,
                };
                match p {
                    Some(p) => {
                        prompts.insert(key, Arc::new(p));
                    }
                    None => tracing::warn!(
                        id = a.id,
                        %lang,
                        "announcement cannot be rendered; callers hear announcement_fallback"
                    ),
                }
            }
        }
    }
    Snapshot {
        bulletins: Arc::new(rows.iter().map(Announcement::bulletin).collect()),
        announcements: rows,
        prompts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn menu() -> MenuFile {
        crate::menu::schema::parse(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("menus/311.yaml"),
            )
            .unwrap(),
        )
        .unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn text_only(id: i64) -> Announcement {
        Announcement {
            id,
            created_at: ts("2026-12-07T12:00:00Z"),
            created_by: "admin".into(),
            starts_at: ts("2026-12-07T12:00:00Z"),
            ends_at: ts("2026-12-07T20:00:00Z"),
            ended_at: None,
            spec: AnnouncementSpec {
                messages: BTreeMap::from([(
                    "en".to_owned(),
                    Message {
                        text: Some("Boil your water before drinking it.".into()),
                        wav_base64: None,
                    },
                )]),
                starts_at: "2026-12-07T12:00:00Z".into(),
                ends_at: "2026-12-07T20:00:00Z".into(),
                entries: vec![],
            },
        }
    }

    /// Speaks every text as 0.1 s of a tone.
    struct Beeper;

    impl Speech for Beeper {
        fn available(&self) -> bool {
            true
        }
        fn render(&self, _lang: &str, name: &str, _text: &str) -> Option<Prompt> {
            let pcm: Vec<i16> = (0..800)
                .map(|i| if i % 16 < 8 { 8000 } else { -8000 })
                .collect();
            Some(Prompt::from_pcm_8k(name, pcm))
        }
    }

    #[test]
    fn text_is_spoken_by_the_speech_seam_or_left_to_the_recorded_fallback() {
        let rows = vec![text_only(3)];
        let spoken = render(rows.clone(), &Snapshot::default(), &Beeper);
        let name = bulletin::message_prompt(3);
        // Found in the caller's language, or another one the message has.
        assert!(spoken.prompt("en", "en", &name).is_some());
        assert!(spoken.prompt("es", "en", &name).is_some());
        let silent = render(rows, &Snapshot::default(), &crate::media::speech::NoSpeech);
        assert!(silent.prompt("en", "en", &name).is_none());
        assert_eq!(silent.bulletins.len(), 1, "still heard, as the fallback");
    }

    #[test]
    fn validation_refuses_text_only_without_speech_and_accepts_it_with() {
        let m = menu();
        let spec = text_only(1).spec;
        let now = ts("2026-12-07T13:00:00Z");
        let e = validate(spec.clone(), &m, "main", &[], &[], false, now).unwrap_err();
        assert!(e.to_string().contains("cannot speak text"), "{e}");
        let v = validate(spec, &m, "main", &[], &[], true, now).unwrap();
        assert_eq!(v.ends_at, ts("2026-12-07T20:00:00Z"));
    }

    #[test]
    fn a_key_another_announcement_uses_at_the_same_time_is_refused() {
        let m = menu();
        let entry = EntrySpec {
            key: "7".into(),
            ticket: Some(TempService {
                service: "storm_debris".into(),
                name: "Storm debris".into(),
                description: None,
                group: None,
            }),
            info: None,
        };
        let mut other = text_only(1);
        other.spec.entries = vec![entry.clone()];
        let mut spec = text_only(2).spec;
        spec.entries = vec![entry];
        let now = ts("2026-12-07T13:00:00Z");
        let e = validate(spec.clone(), &m, "main", &[], &[], true, now);
        assert!(e.is_ok());
        let e = validate(spec, &m, "main", &[], &[other], true, now).unwrap_err();
        assert!(e.to_string().contains("another announcement"), "{e}");
    }
}
