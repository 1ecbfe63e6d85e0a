//! The menu engine: walks one caller through a [`MenuFile`], sans-IO.
//!
//! [`Input`]s go in (call started, a key, the prompts finished, the timer fired, results of
//! work the call did for us) and [`Output`]s come out (play these prompts, stop playing, arm or
//! disarm the one timer, record, file a ticket, look one up, redirect to 911, queue, hang up).
//! There is no clock, no socket and no database here: the call task carries the outputs out
//! and reports back, so every path can be tested by feeding inputs, with no sleeps.
//!
//! Behaviour a caller can rely on:
//! - **Barge-in**: a key stops the prompt playing and is acted on at once.
//! - **Type-ahead**: keys pressed before a menu is reached are kept in order; a menu entered
//!   with keys waiting skips its greeting and takes the next key (`1 1` goes straight from the
//!   main menu to streets to pothole).
//! - **A key acts only on the step that asked for it.** An entry that completes at its
//!   maximum length (the ZIP code's fifth digit) ends at once, but the terminator its prompt
//!   asked for ("...then press pound") may still come: pressed within the inter-digit timeout,
//!   it belongs to that entry and is consumed there, not carried into the next step (where
//!   `#` would skip the recording, end the next entry empty, or go back a menu). The same
//!   holds for the end key pressed again as a recording ends. Keys the current step does not
//!   take (a digit during the recording prompt, anything but 1 or the emergency key while
//!   the ticket number is read) are dropped without cutting the prompt short.
//! - **911 everywhere**: after the language choice, the emergency key (default `9`) redirects
//!   to 911 from every choice menu, whatever the menu's entries say; digit entry (ZIP code,
//!   request number) and recording take keys literally.
//! - `*` repeats the menu (short greeting), `#` goes back; three invalid keys or three silent
//!   waits run the menu's `on_exhausted` action (default: the operator queue).
//! - Until an operator queue exists the call answers [`Input::QueueUnavailable`] and the caller
//!   is offered a general service request instead, so nobody waits on hold forever.

use crate::menu::bulletin::{self, Bulletin, TempAction};
use crate::menu::say::{self, Gender};
use crate::menu::schema::{
    Action, Collect, Duplicates, MenuFile, Record, TicketAction, TicketSteps,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The service code of the general request offered when no operator can take the call.
pub const GENERAL_SERVICE: &str = "general";
/// Its name.
pub const GENERAL_SERVICE_NAME: &str = "General service request";
/// The key that skips the announcements heard after screening (their introduction says so).
pub const SKIP_KEY: char = '#';
/// How many digits a service request number has.
pub(crate) const TICKET_DIGITS: usize = 8;
/// A service request number is read back in groups of this many digits.
pub(crate) const TICKET_DIGIT_GROUP: usize = 4;

/// Something that happened to the call.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The call is answered; start the menu.
    Start,
    /// A key (RFC 4733 or SIP INFO).
    Digit(char),
    /// Everything queued by the last `Play` has been played (not sent after `StopPlayback`).
    PlayDone,
    /// The timer armed by `Output::Timer` fired.
    Timeout,
    /// Recording ended (end key, silence, maximum length); `media_url` names the file, if any
    /// audio was kept.
    Recorded { media_url: Option<String> },
    /// The ticket is committed to the database.
    TicketFiled { id: u64 },
    /// The ticket could not be saved (database trouble); nothing was written.
    TicketFailed,
    /// The answer to `LookupTicket`.
    Status(StatusResult),
    /// No operator queue can take the caller.
    QueueUnavailable,
    /// The answer to `FindOpenRequest`: the caller's newest open request, if any.
    OpenRequest(Option<OpenRequest>),
    /// The answer to `FindDuplicate`: an open request of the same service and ZIP code
    /// (`None` also when the database could not be read: the caller files as usual).
    Duplicate(Option<u64>),
    /// The answer to `JoinRequest`: whether the caller was added to the request.
    Joined { ok: bool },
}

/// A caller's open request, told after screening (`repeat_callers: true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenRequest {
    pub id: u64,
    /// Whole days since it was filed.
    pub days_ago: u32,
}

/// A looked-up request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusResult {
    NotFound,
    Found {
        open: bool,
        days_since_update: u32,
        /// The date it was filed is spoken ([`say::SPOKEN_FILED`] is ready to play).
        filed: bool,
        /// Its status notes are spoken ([`say::SPOKEN_NOTES`] is ready to play).
        notes: bool,
    },
    /// The database could not be read.
    Failed,
}

/// A service request ready to be filed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TicketRequest {
    pub service_code: String,
    pub(crate) service_name: String,
    pub(crate) agency: Option<String>,
    pub(crate) description: Option<String>,
    /// Collected fields (`zipcode`, `address`...).
    pub(crate) fields: Vec<(String, String)>,
    pub(crate) media_url: Option<String>,
    pub(crate) language: String,
    /// How the caller got here, e.g. `language:1 > screening:1 > main:1 > streets:1`.
    pub(crate) menu_path: String,
}

impl TicketRequest {
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a caller entered for a service request that was not filed before they went to an
/// operator: the service chosen and the fields typed so far (`zipcode`...), for the operator's
/// screen and the console's ticket form.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Entered {
    pub service_code: String,
    pub fields: Vec<(String, String)>,
}

impl Entered {
    /// A field the caller typed (`zipcode`, `address`).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the call should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Queue these prompts (names, in [`Engine::language`]); keys interrupt them.
    Play(Vec<String>),
    /// Stop playing and drop the queue.
    StopPlayback,
    /// Arm the single timer (replacing any armed one), or disarm it with `None`.
    Timer(Option<Duration>),
    /// Record the caller until the end key (reported as a digit), silence or the limit.
    StartRecording { max: Duration, silence: Duration },
    /// End the recording now (the caller pressed the end key); `Input::Recorded` follows.
    StopRecording,
    /// Commit this ticket, then report `TicketFiled`/`TicketFailed`.
    FileTicket(TicketRequest),
    /// Look up a request, then report `Status`.
    LookupTicket(u64),
    /// Redirect the caller to 911 now. The engine is finished with the call.
    Emergency {
        reason: Option<String>,
        menu_path: String,
    },
    /// Send the caller to the crisis or utility line named `to` (a `transfers` entry), with
    /// the 911 redirect's fallback and audit; `announce` is said if it cannot be reached. The
    /// engine is finished with the call.
    Transfer {
        to: String,
        announce: Option<String>,
        menu_path: String,
    },
    /// Put the caller in an operator queue (answer `QueueUnavailable` if there is none).
    Queue {
        queue: String,
        skill: Option<String>,
        menu_path: String,
        /// What the caller had entered for a request not filed (the operator takes it on).
        entered: Option<Entered>,
    },
    /// Look for an open request of `service_code` at `zipcode` filed within `days`, then
    /// report `Duplicate`.
    FindDuplicate {
        service_code: String,
        zipcode: String,
        days: u32,
    },
    /// Add the caller to request `id` (its `duplicates` count), then report `Joined`.
    JoinRequest(u64),
    /// The caller's language changed.
    Language(String),
    /// End the call.
    Hangup,
}

/// Where the caller is.
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Not started.
    Idle,
    /// A choice menu.
    Menu {
        id: String,
        failures: u32,
        timeouts: u32,
        waiting: bool,
    },
    /// Playing an information prompt; then back to `id`.
    Info { id: String },
    /// Entering digits for a ticket field or a request number.
    Collect {
        purpose: Purpose,
        spec: Collect,
        digits: String,
        tries: u32,
        waiting: bool,
    },
    /// Playing the recording prompt (`recording` false), or recording (true).
    Record { spec: Record, recording: bool },
    /// Waiting for the database.
    Filing,
    /// Reading the number back, then "press 1 for the main menu".
    AfterTicket { timeouts: u32, waiting: bool },
    /// Waiting for the status lookup.
    LookingUp,
    /// Reading a status, then back to the main menu.
    StatusRead,
    /// No operator: offer a general ticket (1) or the main menu (2).
    Offer { failures: u32, waiting: bool },
    /// Saying goodbye; hang up when it has played.
    Goodbye,
    /// Right after screening, before the main menu: the city's announcements, then the
    /// caller's open request.
    Notice(Notice),
    /// Waiting for the duplicate check before ticket step `next`.
    DupCheck { next: usize },
    /// "This problem is already reported, number ... To add yourself, press 1; to file a new
    /// request anyway, press 2."
    Duplicate {
        id: u64,
        next: usize,
        failures: u32,
        waiting: bool,
    },
    /// Waiting for the caller to be added to request `id`.
    Joining { id: u64 },
    /// Handed over (911, queue) or hung up: inputs are ignored.
    Done,
}

/// What is told between screening and the main menu.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Notice {
    /// The announcements play: `#` skips them, the emergency key still reaches 911.
    Announcement,
    /// "You have an open request, number ... To hear its status, press 1."
    OpenRequest { id: u64, waiting: bool },
}

/// Why digits are being collected.
#[derive(Debug, Clone, PartialEq)]
enum Purpose {
    TicketField { index: usize },
    TicketNumber,
}

/// A key that belongs to the step that just ended: the terminator of an entry that completed
/// at its maximum length, or the end key of a recording that just ended. Pressed by `until`
/// (the inter-digit timeout after the step ended), it is consumed, not passed on.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Claim {
    key: char,
    until: Instant,
}

/// A ticket being put together.
#[derive(Debug, Clone)]
struct Draft {
    req: TicketRequest,
    steps: TicketSteps,
    /// The duplicate check for this service, until it has been made.
    duplicates: Option<Duplicates>,
}

impl Draft {
    fn into_entered(self) -> Entered {
        Entered {
            service_code: self.req.service_code,
            fields: self.req.fields,
        }
    }
}

/// One caller's walk through the menu.
pub struct Engine {
    menu: Arc<MenuFile>,
    main: String,
    language: String,
    state: State,
    /// Menus to go back to.
    stack: Vec<String>,
    /// Menus and keys so far, for tickets, the audit log and operators.
    path: Vec<String>,
    pending: VecDeque<char>,
    /// The latest `now` given to [`Engine::handle`].
    now: Option<Instant>,
    claim: Option<Claim>,
    draft: Option<Draft>,
    /// The draft given up on the way to the action [`Engine::run`] is about to run: an operator
    /// queue carries it on to the operator.
    entered: Option<Entered>,
    /// The ticket could not be saved: do not offer another ticket.
    db_failed: bool,
    out: Vec<Output>,
    /// Per-call figures for metrics.
    stats: EngineStats,
    /// The schedules `when` actions read, and the civil time at one instant of the call.
    calendar: Option<Calendar>,
    /// The city's announcements (heard while active by the calendar's time).
    bulletins: Arc<Vec<Bulletin>>,
    /// The announcements and open request have had their turn (once per call).
    noticed: bool,
    /// The caller's open request, once looked up.
    open_request: Option<OpenRequest>,
}

/// What `when` actions are decided by: the menu's compiled schedules and the wall clock as it
/// read at `anchor` (the engine adds the time since from its own `now`).
#[derive(Debug, Clone)]
struct Calendar {
    schedules: Arc<crate::menu::schedule::Schedules>,
    anchor: Instant,
    wall: jiff::Timestamp,
}

/// What one caller did, for metrics: invalid keys and silent waits per menu, information heard.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct EngineStats {
    pub(crate) invalid: std::collections::BTreeMap<String, u32>,
    pub(crate) timeouts: std::collections::BTreeMap<String, u32>,
    pub(crate) heard_info: bool,
    pub(crate) menus: Vec<String>,
}

impl Engine {
    /// `main` is the menu after screening (`Action::Top` goes there).
    pub fn new(menu: Arc<MenuFile>, main: String) -> Engine {
        let language = menu
            .languages
            .first()
            .cloned()
            .unwrap_or_else(|| "en".into());
        Engine {
            menu,
            main,
            language,
            state: State::Idle,
            stack: Vec::new(),
            path: Vec::new(),
            pending: VecDeque::new(),
            now: None,
            claim: None,
            draft: None,
            entered: None,
            db_failed: false,
            out: Vec::new(),
            stats: EngineStats::default(),
            calendar: None,
            bulletins: Arc::new(Vec::new()),
            noticed: false,
            open_request: None,
        }
    }

    /// The city's announcements: each is heard right after screening while it is active (by
    /// the calendar's clock; without a calendar, none is), and its temporary keys work in the
    /// main menu meanwhile.
    pub fn with_bulletins(mut self, bulletins: Arc<Vec<Bulletin>>) -> Engine {
        self.bulletins = bulletins;
        self
    }

    /// [`Engine::with_bulletins`], on an engine already built.
    pub fn set_bulletins(&mut self, bulletins: Arc<Vec<Bulletin>>) {
        self.bulletins = bulletins;
    }

    /// Decide `when` actions by `schedules`, the civil time being `wall` at `anchor`. Without
    /// it every schedule reads as open.
    pub fn with_calendar(
        mut self,
        schedules: Arc<crate::menu::schedule::Schedules>,
        anchor: Instant,
        wall: jiff::Timestamp,
    ) -> Engine {
        self.calendar = Some(Calendar {
            schedules,
            anchor,
            wall,
        });
        self
    }

    /// Whether `schedule` is open now (a schedule the menu does not have reads as open; the
    /// checker refuses such a menu).
    fn is_open(&self, schedule: &str) -> bool {
        let Some(s) = (self.calendar.as_ref()).and_then(|c| c.schedules.get(schedule)) else {
            return true;
        };
        match self.wall_now() {
            Some(at) => s.is_open(at),
            None => true,
        }
    }

    /// The civil time now, by the calendar.
    fn wall_now(&self) -> Option<jiff::Timestamp> {
        let c = self.calendar.as_ref()?;
        let since = self
            .now
            .map_or(Duration::ZERO, |n| n.saturating_duration_since(c.anchor));
        Some(
            jiff::SignedDuration::try_from(since)
                .ok()
                .and_then(|d| c.wall.checked_add(d).ok())
                .unwrap_or(c.wall),
        )
    }

    /// The announcements active now.
    fn active_bulletins(&self) -> Vec<&Bulletin> {
        let Some(at) = self.wall_now() else {
            return Vec::new();
        };
        self.bulletins.iter().filter(|b| b.active(at)).collect()
    }

    /// Invalid keys, timeouts and menus visited so far.
    pub(crate) fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub(crate) fn language(&self) -> &str {
        &self.language
    }

    /// The menu path so far, `menu:key > menu:key ...`.
    pub(crate) fn menu_path(&self) -> String {
        self.path.join(" > ")
    }

    /// The menu the caller is in (for the admin view).
    pub fn current_menu(&self) -> Option<&str> {
        match &self.state {
            State::Menu { id, .. } | State::Info { id } => Some(id),
            _ => None,
        }
    }

    /// True once the engine has handed the call over or hung up.
    #[cfg(test)]
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The caller hung up. If a ticket had all its digit fields (the description is optional),
    /// it is returned so the call can still file it, with whatever recording was kept.
    pub(crate) fn abandon(&mut self, media_url: Option<String>) -> Option<TicketRequest> {
        let draft = self.draft.take()?;
        let complete = match &self.state {
            State::Record { .. } => true,
            State::Collect {
                purpose: Purpose::TicketField { index },
                ..
            } => *index >= draft.steps.collect.len(),
            State::DupCheck { next } | State::Duplicate { next, .. } => {
                *next >= draft.steps.collect.len()
            }
            _ => false,
        };
        self.state = State::Done;
        complete.then(|| {
            let mut req = draft.req;
            req.media_url = media_url.or(req.media_url);
            req
        })
    }

    /// Feed one input that happened at `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Output> {
        self.now = Some(self.now.map_or(now, |n| n.max(now)));
        match input {
            Input::Start => {
                let start = self.menu.start.clone();
                self.enter_menu(&start, true);
            }
            Input::Digit(d) => {
                let claimed = self
                    .claim
                    .take()
                    .is_some_and(|c| c.key == d && now <= c.until);
                if !claimed {
                    self.pending.push_back(d);
                    self.drain();
                }
            }
            Input::PlayDone => self.on_play_done(),
            Input::Timeout => self.on_timeout(),
            Input::Recorded { media_url } => self.on_recorded(media_url),
            Input::TicketFiled { id } => self.on_filed(id),
            Input::TicketFailed => self.on_file_failed(),
            Input::Status(r) => self.on_status(r),
            Input::QueueUnavailable => self.on_queue_unavailable(),
            Input::OpenRequest(r) => self.open_request = r,
            Input::Duplicate(r) => self.on_duplicate(r),
            Input::Joined { ok } => self.on_joined(ok),
        }
        std::mem::take(&mut self.out)
    }

    fn emit(&mut self, o: Output) {
        self.out.push(o);
    }

    /// `key`, pressed within the inter-digit timeout from now, belongs to the step ending now.
    fn claim(&mut self, key: char) {
        let window = Duration::from_secs_f64(self.defaults().inter_digit_timeout_seconds.max(0.0));
        self.claim = self.now.map(|now| Claim {
            key,
            until: now + window,
        });
    }

    fn play(&mut self, prompts: Vec<String>) {
        self.emit(Output::Play(prompts));
    }

    fn timer(&mut self, secs: f64) {
        self.emit(Output::Timer(Some(Duration::from_secs_f64(secs.max(0.1)))));
    }

    fn defaults(&self) -> &crate::menu::schema::Defaults {
        &self.menu.defaults
    }

    /// After screening, the emergency key redirects from every choice menu.
    fn screened(&self) -> bool {
        self.path
            .iter()
            .any(|p| p.split(':').next() == Some(self.menu.screening.as_str()))
            || self.menu.start == self.menu.screening
    }

    // ---- menus ---------------------------------------------------------------------------

    fn enter_menu(&mut self, id: &str, long: bool) {
        if id == self.main && !self.noticed && self.screened() {
            self.noticed = true;
            if self.start_notice() {
                return;
            }
        }
        let Some(menu) = self.menu.menus.get(id) else {
            // Validation makes this impossible; never strand the caller if it happens.
            self.emergency_safe_fallback();
            return;
        };
        let greet = if long {
            menu.greet_long.clone()
        } else {
            menu.greet_short
                .clone()
                .unwrap_or_else(|| menu.greet_long.clone())
        };
        self.state = State::Menu {
            id: id.to_owned(),
            failures: 0,
            timeouts: 0,
            waiting: false,
        };
        self.stats.menus.push(id.to_owned());
        if self.pending.is_empty() {
            self.play(vec![greet]);
        } else {
            self.drain();
        }
    }

    fn greet_again(&mut self, id: &str, before: Option<String>) {
        let Some(menu) = self.menu.menus.get(id) else {
            return;
        };
        let mut v: Vec<String> = before.into_iter().collect();
        v.push(
            menu.greet_short
                .clone()
                .unwrap_or_else(|| menu.greet_long.clone()),
        );
        self.play(v);
    }

    fn menu_settings(&self, id: &str) -> (f64, u32, u32, String, String, Action) {
        let d = self.defaults();
        let m = self.menu.menus.get(id);
        (
            m.and_then(|m| m.timeout_seconds)
                .unwrap_or(d.timeout_seconds),
            m.and_then(|m| m.max_failures).unwrap_or(d.max_failures),
            m.and_then(|m| m.max_timeouts).unwrap_or(d.max_timeouts),
            m.and_then(|m| m.invalid_prompt.clone())
                .unwrap_or_else(|| d.invalid_prompt.clone()),
            m.and_then(|m| m.timeout_prompt.clone())
                .unwrap_or_else(|| d.timeout_prompt.clone()),
            m.and_then(|m| m.on_exhausted.clone())
                .unwrap_or_else(|| d.on_exhausted.clone()),
        )
    }

    /// Process waiting keys while the state takes keys.
    fn drain(&mut self) {
        while let Some(d) = self.pending.front().copied() {
            if !self.accepts_keys() {
                return;
            }
            self.pending.pop_front();
            if !self.takes(d) {
                continue;
            }
            self.emit(Output::StopPlayback);
            self.emit(Output::Timer(None));
            self.on_key(d);
        }
    }

    /// Whether the current step acts on `d` (and so interrupts its prompt). Keys it has no
    /// use for are dropped and the prompt plays on: a stray digit must not silence the
    /// recording prompt (recording starts when it has played), nor cut the ticket number
    /// short while it is read.
    fn takes(&self, d: char) -> bool {
        match &self.state {
            State::Record { spec, .. } => {
                d == spec.end_key || Some(d) == self.defaults().operator_key
            }
            State::AfterTicket { waiting: false, .. } => {
                d == '1' || d == self.defaults().emergency_key
            }
            State::Notice(Notice::Announcement) => {
                d == SKIP_KEY || d == self.defaults().emergency_key
            }
            _ => true,
        }
    }

    fn accepts_keys(&self) -> bool {
        !matches!(
            self.state,
            State::Idle
                | State::Filing
                | State::LookingUp
                | State::Goodbye
                | State::Done
                | State::DupCheck { .. }
                | State::Joining { .. }
        )
    }

    fn on_key(&mut self, d: char) {
        let emergency_key = self.defaults().emergency_key;
        match self.state.clone() {
            State::Menu { id, failures, .. } => {
                if d == emergency_key && id != self.menu.start && self.screened() {
                    self.path.push(format!("{id}:{d}"));
                    self.emergency(None);
                    return;
                }
                if id == self.main && self.temp_entry(d) {
                    return;
                }
                let action = self
                    .menu
                    .menus
                    .get(&id)
                    .and_then(|m| m.entries.get(&d.to_string()).cloned());
                match action {
                    Some(a) => {
                        self.path.push(format!("{id}:{d}"));
                        self.run(a, &id);
                    }
                    None if d == self.defaults().repeat_key => self.greet_again(&id, None),
                    None if d == self.defaults().back_key => {
                        self.path.push(format!("{id}:{d}"));
                        self.run(Action::Back, &id);
                    }
                    None => self.invalid(&id, failures),
                }
            }
            State::Info { id } => {
                // A key during an information prompt is a choice in the menu it came from.
                self.state = State::Menu {
                    id: id.clone(),
                    failures: 0,
                    timeouts: 0,
                    waiting: true,
                };
                self.on_key(d);
            }
            State::Collect { .. } => self.collect_key(d),
            State::Record { recording, spec } => {
                if d == spec.end_key {
                    if recording {
                        self.emit(Output::StopRecording);
                    } else {
                        // Pressed during the prompt: skip the description.
                        self.state = State::Filing;
                        self.file_draft(None);
                    }
                } else if Some(d) == self.defaults().operator_key {
                    // The caller would rather tell an operator: what they entered goes along.
                    if recording {
                        self.emit(Output::StopRecording);
                    }
                    self.emit(Output::StopPlayback);
                    self.path.push(format!("record:{d}"));
                    self.entered = self.draft.take().map(Draft::into_entered);
                    let to = match &self.defaults().on_exhausted {
                        Action::Queue(q) => q.clone(),
                        _ => crate::menu::schema::QueueTarget {
                            queue: "general".into(),
                            skill: None,
                        },
                    };
                    let from = self.main.clone();
                    self.run(Action::Queue(to), &from);
                }
            }
            State::AfterTicket { .. } => {
                if d == emergency_key {
                    self.emergency(None);
                } else if d == '1' {
                    self.path.push("after_ticket:1".into());
                    self.stack.clear();
                    let main = self.main.clone();
                    self.enter_menu(&main, false);
                } else {
                    self.state = State::AfterTicket {
                        timeouts: 0,
                        waiting: false,
                    };
                    self.play(vec!["invalid_entry".into(), "after_ticket".into()]);
                }
            }
            State::StatusRead => {
                let main = self.main.clone();
                self.state = State::Menu {
                    id: main.clone(),
                    failures: 0,
                    timeouts: 0,
                    waiting: true,
                };
                self.on_key(d);
            }
            State::Offer { failures, .. } => {
                if d == emergency_key {
                    self.emergency(None);
                } else if d == '1' {
                    self.path.push("offer:1".into());
                    let t = TicketAction {
                        service: GENERAL_SERVICE.into(),
                        name: GENERAL_SERVICE_NAME.into(),
                        description: None,
                        agency: None,
                        keywords: vec![],
                        steps: None,
                        house_number: false,
                        duplicates: None,
                    };
                    self.start_ticket(&t);
                } else if d == '2' {
                    self.path.push("offer:2".into());
                    self.stack.clear();
                    let main = self.main.clone();
                    self.enter_menu(&main, true);
                } else if failures + 1 >= self.defaults().max_failures {
                    self.goodbye();
                } else {
                    self.state = State::Offer {
                        failures: failures + 1,
                        waiting: false,
                    };
                    self.play(vec!["invalid_entry".into(), "offer_general_ticket".into()]);
                }
            }
            State::Notice(n) => self.notice_key(n, d),
            State::Duplicate {
                id, next, failures, ..
            } => self.duplicate_key(id, next, failures, d),
            State::Idle
            | State::Filing
            | State::LookingUp
            | State::Goodbye
            | State::Done
            | State::DupCheck { .. }
            | State::Joining { .. } => {}
        }
    }

    fn invalid(&mut self, id: &str, failures: u32) {
        let (_, max_failures, _, invalid, _, exhausted) = self.menu_settings(id);
        *self.stats.invalid.entry(id.to_owned()).or_insert(0) += 1;
        let failures = failures + 1;
        if failures >= max_failures {
            self.path.push(format!("{id}:exhausted"));
            self.run(exhausted, id);
            return;
        }
        if let State::Menu {
            failures: f,
            waiting,
            ..
        } = &mut self.state
        {
            *f = failures;
            *waiting = false;
        }
        self.greet_again(id, Some(invalid));
    }

    fn run(&mut self, action: Action, from: &str) {
        let entered = self.entered.take();
        match action {
            Action::Goto(to) => {
                self.stack.push(from.to_owned());
                self.enter_menu(&to, true);
            }
            Action::Back => match self.stack.pop() {
                Some(prev) => self.enter_menu(&prev, false),
                None => self.enter_menu(from, false),
            },
            Action::Top => {
                self.stack.clear();
                let main = self.main.clone();
                self.enter_menu(&main, false);
            }
            Action::Repeat => self.enter_menu(from, false),
            Action::Info(prompt) => {
                self.stats.heard_info = true;
                self.state = State::Info {
                    id: from.to_owned(),
                };
                self.play(vec![prompt]);
            }
            Action::Language(sw) => {
                self.language = sw.set.clone();
                self.emit(Output::Language(sw.set));
                self.stack.push(from.to_owned());
                self.enter_menu(&sw.goto, true);
            }
            Action::Ticket(t) => self.start_ticket(&t),
            Action::Status => {
                let spec = Collect {
                    field: "service_request_id".into(),
                    prompt: "enter_ticket_number".into(),
                    invalid_prompt: "ticket_not_found".into(),
                    min_digits: TICKET_DIGITS,
                    max_digits: TICKET_DIGITS,
                    pattern: None,
                    terminator: '#',
                    tries: 3,
                    optional: false,
                    read_back: false,
                };
                self.start_collect(Purpose::TicketNumber, spec, Vec::new());
            }
            Action::Queue(q) => {
                self.state = State::Done;
                let menu_path = self.menu_path();
                self.emit(Output::Queue {
                    queue: q.queue,
                    skill: q.skill,
                    menu_path,
                    entered,
                });
            }
            Action::Emergency(e) => self.emergency(e.reason),
            Action::Hangup => self.goodbye(),
            Action::Transfer(t) => {
                self.state = State::Done;
                self.pending.clear();
                let menu_path = self.menu_path();
                self.emit(Output::StopPlayback);
                self.emit(Output::Timer(None));
                self.emit(Output::Transfer {
                    to: t.to,
                    announce: t.announce,
                    menu_path,
                });
            }
            Action::When(w) => {
                let branch = if self.is_open(&w.schedule) {
                    w.open
                } else {
                    w.closed
                };
                self.run(branch, from);
            }
        }
    }

    fn emergency(&mut self, reason: Option<String>) {
        self.state = State::Done;
        self.pending.clear();
        let menu_path = self.menu_path();
        self.emit(Output::StopPlayback);
        self.emit(Output::Timer(None));
        self.emit(Output::Emergency { reason, menu_path });
    }

    /// A state that should be impossible: the safest thing is the operator (or 911 advice).
    fn emergency_safe_fallback(&mut self) {
        self.state = State::Done;
        let menu_path = self.menu_path();
        let entered = self.draft.take().map(Draft::into_entered);
        self.emit(Output::Queue {
            queue: "general".into(),
            skill: None,
            menu_path,
            entered,
        });
    }

    fn goodbye(&mut self) {
        self.state = State::Goodbye;
        self.play(vec!["goodbye".into()]);
    }

    // ---- tickets ---------------------------------------------------------------------------

    fn start_ticket(&mut self, t: &TicketAction) {
        let steps = t
            .steps
            .clone()
            .unwrap_or_else(|| self.defaults().ticket.clone());
        let steps = if t.house_number {
            with_house_number(steps)
        } else {
            steps
        };
        self.draft = Some(Draft {
            duplicates: t.duplicates.or(self.menu.duplicates),
            req: TicketRequest {
                service_code: t.service.clone(),
                service_name: t.name.clone(),
                agency: t.agency.clone(),
                description: None,
                fields: vec![],
                media_url: None,
                language: self.language.clone(),
                menu_path: self.menu_path(),
            },
            steps,
        });
        self.next_ticket_step(0, Vec::new());
    }

    /// Go on to step `index` of the draft ticket; `lead` (the read-back of the entry just
    /// made) is played before the step's own prompt.
    fn next_ticket_step(&mut self, index: usize, lead: Vec<String>) {
        let Some(draft) = &self.draft else { return };
        if let Some(spec) = draft.steps.collect.get(index).cloned() {
            self.start_collect(Purpose::TicketField { index }, spec, lead);
            return;
        }
        match draft.steps.record.clone() {
            Some(spec) => {
                let mut prompts = lead;
                prompts.push(spec.prompt.clone());
                prompts.extend(spec.beep.clone());
                self.state = State::Record {
                    spec,
                    recording: false,
                };
                self.play(prompts);
            }
            None => {
                self.state = State::Filing;
                if !lead.is_empty() {
                    self.play(lead);
                }
                self.file_draft(None);
            }
        }
    }

    /// Ask for digits. With keys typed ahead, the prompt (and `lead`) is skipped and they are
    /// taken at once.
    fn start_collect(&mut self, purpose: Purpose, spec: Collect, lead: Vec<String>) {
        let mut prompts = lead;
        prompts.push(spec.prompt.clone());
        self.state = State::Collect {
            purpose,
            spec,
            digits: String::new(),
            tries: 0,
            waiting: false,
        };
        if self.pending.is_empty() {
            self.play(prompts);
        } else {
            self.drain();
        }
    }

    fn collect_key(&mut self, d: char) {
        let State::Collect { spec, digits, .. } = &mut self.state else {
            return;
        };
        if d == spec.terminator {
            self.finish_collect();
            return;
        }
        if d == '*' && spec.terminator != '*' {
            // Start the entry over.
            digits.clear();
            let p = spec.prompt.clone();
            self.play(vec![p]);
            return;
        }
        digits.push(d);
        let full = digits.len() >= spec.max_digits;
        let terminator = spec.terminator;
        let inter = self.defaults().inter_digit_timeout_seconds;
        if full {
            // The prompt asked for the terminator after the digits: it may still come.
            self.claim(terminator);
            self.finish_collect();
        } else {
            if let State::Collect { waiting, .. } = &mut self.state {
                *waiting = true;
            }
            self.timer(inter);
        }
    }

    fn collect_valid(spec: &Collect, digits: &str) -> bool {
        if digits.len() < spec.min_digits || digits.len() > spec.max_digits {
            return false;
        }
        match &spec.pattern {
            Some(p) => regex::Regex::new(p)
                .map(|r| r.is_match(digits))
                .unwrap_or(false),
            None => digits.chars().all(|c| c.is_ascii_digit()),
        }
    }

    fn finish_collect(&mut self) {
        let State::Collect {
            purpose,
            spec,
            digits,
            tries,
            ..
        } = self.state.clone()
        else {
            return;
        };
        self.emit(Output::Timer(None));
        if Self::collect_valid(&spec, &digits) {
            match purpose {
                Purpose::TicketField { index } if digits.is_empty() => {
                    // An entry that may be empty (the house number), skipped with pound.
                    self.next_ticket_step(index + 1, Vec::new());
                }
                Purpose::TicketField { index } => {
                    // "You entered 1 0 4 5 8", before whatever comes next.
                    let lead = if spec.read_back {
                        let mut v = vec!["you_entered".to_owned()];
                        v.extend(say::digits(&digits));
                        v
                    } else {
                        Vec::new()
                    };
                    if let Some(d) = &mut self.draft {
                        d.req.fields.push((spec.field.clone(), digits));
                    }
                    self.after_field(index, lead);
                }
                Purpose::TicketNumber => {
                    let id = digits.parse().unwrap_or(0);
                    self.state = State::LookingUp;
                    self.emit(Output::LookupTicket(id));
                }
            }
            return;
        }
        let tries = tries + 1;
        if tries >= spec.tries {
            match purpose {
                Purpose::TicketField { index } if spec.optional => {
                    self.next_ticket_step(index + 1, Vec::new())
                }
                Purpose::TicketNumber => {
                    // Could not get a number: back to the main menu.
                    self.play(vec![spec.invalid_prompt.clone()]);
                    self.stack.clear();
                    let main = self.main.clone();
                    self.enter_menu(&main, false);
                }
                Purpose::TicketField { .. } => {
                    self.entered = self.draft.take().map(Draft::into_entered);
                    let exhausted = self.defaults().on_exhausted.clone();
                    let from = self.main.clone();
                    self.run(exhausted, &from);
                }
            }
            return;
        }
        let again = vec![spec.invalid_prompt.clone(), spec.prompt.clone()];
        self.state = State::Collect {
            purpose,
            spec,
            digits: String::new(),
            tries,
            waiting: false,
        };
        self.play(again);
    }

    fn on_recorded(&mut self, media_url: Option<String>) {
        if let State::Record { spec, .. } = &self.state {
            // Ended by its key, silence or the limit: the end key pressed (again) now is
            // the caller finishing the recording, not a choice in what comes next.
            let end_key = spec.end_key;
            self.claim(end_key);
            self.state = State::Filing;
            self.file_draft(media_url);
        }
    }

    fn file_draft(&mut self, media_url: Option<String>) {
        let Some(draft) = &mut self.draft else {
            return;
        };
        draft.req.media_url = media_url;
        let req = draft.req.clone();
        self.emit(Output::FileTicket(req));
    }

    fn on_filed(&mut self, id: u64) {
        if self.state != State::Filing {
            return;
        }
        self.draft = None;
        // Keys typed before the number existed must not skip its read-back.
        self.pending.clear();
        let digits = say::digits_grouped(&id.to_string(), TICKET_DIGIT_GROUP);
        let mut prompts = vec!["ticket_filed".to_owned()];
        prompts.extend(digits.iter().cloned());
        prompts.push("ticket_again".into());
        prompts.extend(digits);
        prompts.push("after_ticket".into());
        self.state = State::AfterTicket {
            timeouts: 0,
            waiting: false,
        };
        self.play(prompts);
    }

    fn on_file_failed(&mut self) {
        if self.state != State::Filing {
            return;
        }
        self.entered = self.draft.take().map(Draft::into_entered);
        self.db_failed = true;
        self.play(vec!["db_error".into()]);
        let from = self.main.clone();
        self.run(
            Action::Queue(crate::menu::schema::QueueTarget {
                queue: "general".into(),
                skill: None,
            }),
            &from,
        );
    }

    fn on_status(&mut self, r: StatusResult) {
        if self.state != State::LookingUp {
            return;
        }
        // Keys typed while the request was looked up must not skip what is read about it.
        self.pending.clear();
        let prompts = match r {
            StatusResult::NotFound => vec!["ticket_not_found".to_owned()],
            StatusResult::Failed => vec!["db_error".to_owned()],
            StatusResult::Found {
                open,
                days_since_update,
                filed,
                notes,
            } => {
                let mut v = vec![if open {
                    "ticket_status_open".to_owned()
                } else {
                    "ticket_status_closed".to_owned()
                }];
                // "Filed on December third, at 2:15 PM." (speech; nothing without it).
                if filed {
                    v.push(say::SPOKEN_FILED.to_owned());
                }
                // "The latest update was today / yesterday / twelve days ago."
                match days_since_update {
                    0 => v.push("updated_today".into()),
                    1 => v.push("updated_yesterday".into()),
                    n => {
                        v.push("ticket_last_update".into());
                        v.extend(say::number(&self.language, n.into(), Gender::Masculine));
                        v.push("updated_days_ago_post".into());
                    }
                }
                // What the city wrote about it, spoken (nothing without speech).
                if notes {
                    v.push(say::SPOKEN_NOTES.to_owned());
                }
                v
            }
        };
        self.state = State::StatusRead;
        self.play(prompts);
    }

    fn on_queue_unavailable(&mut self) {
        if self.state != State::Done {
            return;
        }
        if self.db_failed {
            // Not "we can take your request instead": the database just failed to.
            self.state = State::Goodbye;
            self.play(vec!["call_again_later".into()]);
            return;
        }
        self.state = State::Offer {
            failures: 0,
            waiting: false,
        };
        self.play(vec![
            "operator_unavailable".into(),
            "offer_general_ticket".into(),
        ]);
    }

    // ---- after screening: announcements and the caller's open request ----------------------

    /// Start what is told between screening and the main menu; false if there is nothing.
    fn start_notice(&mut self) -> bool {
        let messages: Vec<String> = self
            .active_bulletins()
            .iter()
            .map(|b| bulletin::message_prompt(b.id))
            .collect();
        if messages.is_empty() {
            return self.start_open_request();
        }
        let mut prompts = vec!["announcement_intro".to_owned()];
        prompts.extend(messages);
        self.state = State::Notice(Notice::Announcement);
        self.play(prompts);
        self.drain();
        true
    }

    /// "You have an open request, number ..., filed three days ago. To hear its status, press
    /// 1." False if the caller has none (or it was not known in time).
    fn start_open_request(&mut self) -> bool {
        let Some(r) = self.open_request.filter(|_| self.menu.repeat_callers) else {
            return false;
        };
        let mut prompts = vec!["open_request".to_owned()];
        prompts.extend(say::digits_grouped(&r.id.to_string(), TICKET_DIGIT_GROUP));
        match r.days_ago {
            0 => prompts.push("filed_today".into()),
            1 => prompts.push("filed_yesterday".into()),
            n => {
                prompts.push("filed_days_ago_pre".into());
                prompts.extend(say::number(&self.language, n.into(), Gender::Masculine));
                prompts.push("filed_days_ago_post".into());
            }
        }
        prompts.push("open_request_status".into());
        self.state = State::Notice(Notice::OpenRequest {
            id: r.id,
            waiting: false,
        });
        self.play(prompts);
        self.drain();
        true
    }

    /// The announcements were heard (or skipped): the open request, else the main menu.
    fn end_announcements(&mut self) {
        if !self.start_open_request() {
            let main = self.main.clone();
            self.enter_menu(&main, true);
        }
    }

    fn notice_key(&mut self, notice: Notice, d: char) {
        if d == self.defaults().emergency_key {
            self.path.push(format!("notice:{d}"));
            self.emergency(None);
            return;
        }
        match notice {
            Notice::Announcement => {
                // Only the skip key gets here (`takes`).
                self.path.push(format!("announcement:{d}"));
                self.end_announcements();
            }
            Notice::OpenRequest { id, .. } if d == '1' => {
                self.path.push(format!("open_request:{d}"));
                self.state = State::LookingUp;
                self.emit(Output::LookupTicket(id));
            }
            Notice::OpenRequest { .. } => {
                // Any other key is a choice in the main menu.
                self.pending.push_front(d);
                let main = self.main.clone();
                self.enter_menu(&main, true);
            }
        }
    }

    /// A temporary key of an active announcement, pressed in the main menu: true if it was one.
    fn temp_entry(&mut self, d: char) -> bool {
        let found = self.active_bulletins().iter().find_map(|b| {
            b.entries
                .iter()
                .find(|e| e.key == d)
                .map(|e| (b.id, e.action.clone()))
        });
        let Some((id, action)) = found else {
            return false;
        };
        let main = self.main.clone();
        self.path.push(format!("{main}:{d}"));
        match action {
            TempAction::Ticket(t) => self.start_ticket(&t),
            TempAction::Info => {
                self.stats.heard_info = true;
                self.state = State::Info { id: main };
                self.play(vec![bulletin::entry_prompt(id, d)]);
            }
        }
        true
    }

    // ---- duplicate reports -------------------------------------------------------------------

    /// Ticket step `index` is done: check for a duplicate after the ZIP code (when the service
    /// asks for it), else go on to the next step.
    fn after_field(&mut self, index: usize, lead: Vec<String>) {
        let check = self.draft.as_mut().and_then(|d| {
            let zip = d.req.field("zipcode")?.to_owned();
            let days = d.duplicates.take()?.days;
            Some((d.req.service_code.clone(), zip, days))
        });
        let Some((service_code, zipcode, days)) = check else {
            self.next_ticket_step(index + 1, lead);
            return;
        };
        if !lead.is_empty() {
            self.play(lead);
        }
        self.state = State::DupCheck { next: index + 1 };
        self.emit(Output::FindDuplicate {
            service_code,
            zipcode,
            days,
        });
    }

    fn on_duplicate(&mut self, found: Option<u64>) {
        let State::DupCheck { next } = self.state else {
            return;
        };
        let Some(id) = found else {
            self.next_ticket_step(next, Vec::new());
            return;
        };
        // Keys typed meanwhile must not answer a question not yet asked.
        self.pending.clear();
        let mut prompts = vec!["already_reported".to_owned()];
        prompts.extend(say::digits_grouped(&id.to_string(), TICKET_DIGIT_GROUP));
        prompts.push("duplicate_choice".into());
        self.state = State::Duplicate {
            id,
            next,
            failures: 0,
            waiting: false,
        };
        self.play(prompts);
    }

    /// A key (`'\0'`: silence) in answer to "already reported".
    fn duplicate_key(&mut self, id: u64, next: usize, failures: u32, d: char) {
        if d == self.defaults().emergency_key {
            self.emergency(None);
        } else if d == '1' {
            self.path.push("duplicate:1".into());
            self.state = State::Joining { id };
            self.emit(Output::JoinRequest(id));
        } else if d == '2' {
            self.path.push("duplicate:2".into());
            self.next_ticket_step(next, Vec::new());
        } else if failures + 1 >= self.defaults().max_failures {
            // Never lose the report: file it as a new request.
            self.next_ticket_step(next, Vec::new());
        } else {
            let before = if d == '\0' {
                "no_entry"
            } else {
                "invalid_entry"
            };
            self.state = State::Duplicate {
                id,
                next,
                failures: failures + 1,
                waiting: false,
            };
            self.play(vec![before.into(), "duplicate_choice".into()]);
        }
    }

    fn on_joined(&mut self, ok: bool) {
        let State::Joining { id } = self.state else {
            return;
        };
        if !ok {
            self.state = State::Filing;
            self.on_file_failed();
            return;
        }
        self.draft = None;
        self.pending.clear();
        let mut prompts = vec!["added_to_request".to_owned()];
        prompts.extend(say::digits_grouped(&id.to_string(), TICKET_DIGIT_GROUP));
        prompts.push("after_ticket".into());
        self.state = State::AfterTicket {
            timeouts: 0,
            waiting: false,
        };
        self.play(prompts);
    }

    // ---- time --------------------------------------------------------------------------------

    fn on_play_done(&mut self) {
        match self.state.clone() {
            State::Menu { id, .. } => {
                let (timeout, ..) = self.menu_settings(&id);
                if let State::Menu { waiting, .. } = &mut self.state {
                    *waiting = true;
                }
                self.timer(timeout);
            }
            State::Info { id } => self.enter_menu(&id, false),
            State::Collect { .. } => {
                if let State::Collect { waiting, .. } = &mut self.state {
                    *waiting = true;
                }
                let t = self.defaults().timeout_seconds;
                self.timer(t);
            }
            State::Record {
                spec,
                recording: false,
            } => {
                let max = Duration::from_secs(spec.max_seconds as u64);
                let silence = Duration::from_secs(spec.silence_seconds as u64);
                self.state = State::Record {
                    spec,
                    recording: true,
                };
                self.emit(Output::StartRecording { max, silence });
            }
            State::AfterTicket { timeouts, .. } => {
                self.state = State::AfterTicket {
                    timeouts,
                    waiting: true,
                };
                let t = self.defaults().timeout_seconds;
                self.timer(t);
            }
            State::StatusRead => {
                self.stack.clear();
                let main = self.main.clone();
                self.enter_menu(&main, false);
            }
            State::Offer { failures, .. } => {
                self.state = State::Offer {
                    failures,
                    waiting: true,
                };
                let t = self.defaults().timeout_seconds;
                self.timer(t);
            }
            State::Goodbye => {
                self.state = State::Done;
                self.emit(Output::Hangup);
            }
            State::Notice(Notice::Announcement) => self.end_announcements(),
            State::Notice(Notice::OpenRequest { id, .. }) => {
                self.state = State::Notice(Notice::OpenRequest { id, waiting: true });
                let t = self.defaults().timeout_seconds;
                self.timer(t);
            }
            State::Duplicate {
                id, next, failures, ..
            } => {
                self.state = State::Duplicate {
                    id,
                    next,
                    failures,
                    waiting: true,
                };
                let t = self.defaults().timeout_seconds;
                self.timer(t);
            }
            State::DupCheck { .. } | State::Joining { .. } => {}
            State::Idle
            | State::Record {
                recording: true, ..
            }
            | State::Filing
            | State::LookingUp
            | State::Done => {}
        }
    }

    fn on_timeout(&mut self) {
        match self.state.clone() {
            State::Menu {
                id,
                timeouts,
                waiting: true,
                ..
            } => {
                let on_timeout = self.menu.menus.get(&id).and_then(|m| m.on_timeout.clone());
                if let Some(a) = on_timeout {
                    self.path.push(format!("{id}:timeout"));
                    self.run(a, &id);
                    return;
                }
                let (_, _, max_timeouts, _, timeout_prompt, exhausted) = self.menu_settings(&id);
                *self.stats.timeouts.entry(id.clone()).or_insert(0) += 1;
                let timeouts = timeouts + 1;
                if timeouts >= max_timeouts {
                    self.path.push(format!("{id}:timeout"));
                    self.run(exhausted, &id);
                    return;
                }
                if let State::Menu {
                    timeouts: t,
                    waiting,
                    ..
                } = &mut self.state
                {
                    *t = timeouts;
                    *waiting = false;
                }
                self.greet_again(&id, Some(timeout_prompt));
            }
            State::Collect { waiting: true, .. } => {
                // The caller stopped typing: take what we have (nothing keyed is a failed try).
                self.finish_collect();
            }
            State::AfterTicket { waiting: true, .. } => self.goodbye(),
            State::Notice(Notice::OpenRequest { waiting: true, .. }) => {
                let main = self.main.clone();
                self.enter_menu(&main, true);
            }
            State::Duplicate {
                id,
                next,
                failures,
                waiting: true,
            } => self.duplicate_key(id, next, failures, '\0'),
            State::Offer {
                failures,
                waiting: true,
            } => {
                if failures + 1 >= self.defaults().max_timeouts {
                    self.goodbye();
                } else {
                    self.state = State::Offer {
                        failures: failures + 1,
                        waiting: false,
                    };
                    self.play(vec!["no_entry".into(), "offer_general_ticket".into()]);
                }
            }
            _ => {}
        }
    }
}

/// `steps` for a ticket with `house_number: true`: the house number asked right after the
/// ZIP code (or after the last entry when there is no ZIP), and the shipped recording prompt
/// replaced by the one that asks for the street.
fn with_house_number(mut steps: TicketSteps) -> TicketSteps {
    let at = (steps.collect.iter())
        .position(|c| c.field == "zipcode")
        .map_or(steps.collect.len(), |i| i + 1);
    steps.collect.insert(at, Collect::house_number());
    if let Some(r) = &mut steps.record {
        if r.prompt == Record::default().prompt {
            r.prompt = super::schema::RECORD_STREET_PROMPT.into();
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::menu::schema::parse;

    const MENU: &str = r#"
languages: [en, es]
start: language
screening: screening
menus:
  language:
    greet_long: language_menu
    on_timeout: {language: {set: en, goto: screening}}
    entries:
      "1": {language: {set: en, goto: screening}}
      "2": {language: {set: es, goto: screening}}
  screening:
    greet_long: screening
    on_timeout: {goto: main}
    entries:
      "1": {goto: main}
      "9": emergency
  main:
    greet_long: main_menu
    greet_short: main_menu_short
    entries:
      "1": {goto: streets}
      "3": {info: recycling_info}
      "6": status
      "0": {queue: general}
      "9": emergency
  streets:
    greet_long: streets_menu
    greet_short: streets_menu_short
    entries:
      "1": {ticket: {service: pothole, name: Pothole, agency: Streets}}
      "2":
        ticket:
          service: streetlight
          name: Streetlight
          steps:
            collect:
              - {field: zipcode, prompt: enter_zip, min_digits: 5, max_digits: 5}
              - {field: address, prompt: enter_pole_number, min_digits: 1, max_digits: 6}
            record: null
      "5": {emergency: {reason: downed power lines}}
      "7": top
      "8": hangup
"#;

    fn engine() -> Engine {
        let f = parse(MENU).expect("test menu parses");
        Engine::new(Arc::new(f), "main".into())
    }

    fn plays(out: &[Output]) -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Output::Play(p) => Some(p.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Feed `i` at the engine's current (virtual) time: no time passes between inputs unless a
    /// test says so with [`after`].
    fn h(e: &mut Engine, i: Input) -> Vec<Output> {
        let now = e.now.unwrap_or_else(Instant::now);
        e.handle(now, i)
    }

    /// Feed `i` `secs` after the engine's latest input.
    fn after(e: &mut Engine, secs: f64, i: Input) -> Vec<Output> {
        let now = e.now.unwrap_or_else(Instant::now) + Duration::from_secs_f64(secs);
        e.handle(now, i)
    }

    fn keys(e: &mut Engine, ks: &str) -> Vec<Output> {
        ks.chars().flat_map(|k| h(e, Input::Digit(k))).collect()
    }

    /// Start, pick English, pass screening: now at the main menu with its greeting played.
    fn at_main() -> Engine {
        let mut e = engine();
        h(&mut e, Input::Start);
        keys(&mut e, "11");
        h(&mut e, Input::PlayDone);
        assert_eq!(e.current_menu(), Some("main"));
        e
    }

    /// An engine whose calendar reads `wall` now, with one announcement (id 4) from 14:00 to
    /// 18:00 that adds key 7 (a storm debris ticket) to the main menu.
    fn with_bulletin(wall: &str) -> Engine {
        let ts = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let schedules = Arc::new(crate::menu::schedule::Schedules::default());
        let b = Bulletin {
            id: 4,
            starts_at: ts("2026-12-07T14:00:00Z"),
            ends_at: ts("2026-12-07T18:00:00Z"),
            entries: vec![bulletin::TempEntry {
                key: '7',
                action: TempAction::Ticket(Box::new(TicketAction {
                    service: "storm_debris".into(),
                    name: "Storm debris".into(),
                    description: None,
                    agency: None,
                    keywords: vec![],
                    steps: None,
                    house_number: false,
                    duplicates: None,
                })),
            }],
        };
        engine()
            .with_calendar(schedules, Instant::now(), ts(wall))
            .with_bulletins(Arc::new(vec![b]))
    }

    #[test]
    fn announcement_plays_after_screening_only_and_pound_skips_it() {
        let mut e = with_bulletin("2026-12-07T15:00:00Z");
        assert_eq!(plays(&h(&mut e, Input::Start)), vec!["language_menu"]);
        // The screening is not delayed by it.
        assert_eq!(plays(&keys(&mut e, "1")), vec!["screening"]);
        let out = keys(&mut e, "1");
        assert_eq!(plays(&out), vec!["announcement_intro", "announcement:4"]);
        // Digits other than # and 9 neither cut it nor act.
        assert!(keys(&mut e, "3").is_empty());
        let out = keys(&mut e, "#");
        assert_eq!(out[0], Output::StopPlayback);
        assert_eq!(plays(&out), vec!["main_menu"]);
        // Its key 7 files a storm debris ticket from the main menu.
        h(&mut e, Input::PlayDone);
        let out = keys(&mut e, "7");
        assert_eq!(plays(&out), vec!["enter_zip"]);
    }

    #[test]
    fn nine_during_the_announcement_is_911_and_it_ends_into_the_main_menu() {
        let mut e = with_bulletin("2026-12-07T15:00:00Z");
        h(&mut e, Input::Start);
        keys(&mut e, "11");
        let out = keys(&mut e, "9");
        assert!(
            matches!(out.last(), Some(Output::Emergency { .. })),
            "{out:?}"
        );
        let mut e = with_bulletin("2026-12-07T15:00:00Z");
        h(&mut e, Input::Start);
        keys(&mut e, "11");
        assert_eq!(plays(&h(&mut e, Input::PlayDone)), vec!["main_menu"]);
    }

    #[test]
    fn an_announcement_outside_its_hours_is_not_heard_and_its_key_is_invalid() {
        for wall in ["2026-12-07T13:59:59Z", "2026-12-07T18:00:00Z"] {
            let mut e = with_bulletin(wall);
            h(&mut e, Input::Start);
            keys(&mut e, "1");
            let out = keys(&mut e, "1");
            assert_eq!(plays(&out), vec!["main_menu"], "{wall}");
            h(&mut e, Input::PlayDone);
            assert_eq!(plays(&keys(&mut e, "7"))[0], "invalid_entry", "{wall}");
        }
        // An announcement starting while the call is in the menu is not heard at screening's
        // end if it has not started by then (the engine reads its own clock).
        let mut e = with_bulletin("2026-12-07T13:59:00Z");
        h(&mut e, Input::Start);
        keys(&mut e, "1");
        let out = after(&mut e, 61.0, Input::Digit('1'));
        assert_eq!(plays(&out), vec!["announcement_intro", "announcement:4"]);
    }

    #[test]
    fn open_request_is_told_after_screening_when_the_menu_asks_and_1_reads_its_status() {
        let mut f = parse(MENU).unwrap();
        f.repeat_callers = true;
        let mut e = Engine::new(Arc::new(f), "main".into());
        h(&mut e, Input::Start);
        h(
            &mut e,
            Input::OpenRequest(Some(OpenRequest {
                id: 12345678,
                days_ago: 3,
            })),
        );
        keys(&mut e, "1");
        let out = keys(&mut e, "1");
        let p = plays(&out);
        assert_eq!(p.first().map(String::as_str), Some("open_request"));
        assert_eq!(
            p[p.len() - 4..],
            [
                "filed_days_ago_pre",
                "num_3",
                "filed_days_ago_post",
                "open_request_status"
            ]
        );
        h(&mut e, Input::PlayDone);
        let out = keys(&mut e, "1");
        assert!(out.contains(&Output::LookupTicket(12345678)), "{out:?}");
        // Off in the menu: nothing is told.
        let mut e = engine();
        h(&mut e, Input::Start);
        h(
            &mut e,
            Input::OpenRequest(Some(OpenRequest {
                id: 12345678,
                days_ago: 3,
            })),
        );
        keys(&mut e, "1");
        assert_eq!(plays(&keys(&mut e, "1")), vec!["main_menu"]);
    }

    #[test]
    fn duplicate_check_after_the_zip_offers_to_join_or_file_anew() {
        let mut f = parse(MENU).unwrap();
        f.duplicates = Some(Duplicates { days: 7 });
        let mut e = Engine::new(Arc::new(f), "main".into());
        h(&mut e, Input::Start);
        keys(&mut e, "1111");
        let out = keys(&mut e, "94103");
        assert!(out.contains(&Output::FindDuplicate {
            service_code: "pothole".into(),
            zipcode: "94103".into(),
            days: 7,
        }));
        let out = h(&mut e, Input::Duplicate(Some(12345678)));
        assert_eq!(plays(&out)[0], "already_reported");
        let out = keys(&mut e, "1");
        assert!(out.contains(&Output::JoinRequest(12345678)));
        let out = h(&mut e, Input::Joined { ok: true });
        assert_eq!(plays(&out)[0], "added_to_request");
        // 2 files anew: the recording step follows.
        let mut f = parse(MENU).unwrap();
        f.duplicates = Some(Duplicates { days: 7 });
        let mut e = Engine::new(Arc::new(f), "main".into());
        h(&mut e, Input::Start);
        keys(&mut e, "1111");
        keys(&mut e, "94103");
        h(&mut e, Input::Duplicate(Some(12345678)));
        let out = keys(&mut e, "2");
        assert_eq!(plays(&out), vec!["record_description", "beep"]);
        // No duplicate (or a failed lookup): on as usual.
        let mut f = parse(MENU).unwrap();
        f.duplicates = Some(Duplicates { days: 7 });
        let mut e = Engine::new(Arc::new(f), "main".into());
        h(&mut e, Input::Start);
        keys(&mut e, "1111");
        keys(&mut e, "94103");
        let out = h(&mut e, Input::Duplicate(None));
        assert_eq!(plays(&out), vec!["record_description", "beep"]);
    }

    #[test]
    fn start_plays_language_menu_and_timeout_picks_english() {
        let mut e = engine();
        assert_eq!(plays(&h(&mut e, Input::Start)), vec!["language_menu"]);
        let out = h(&mut e, Input::PlayDone);
        assert!(matches!(out[..], [Output::Timer(Some(_))]));
        let out = h(&mut e, Input::Timeout);
        assert!(out.contains(&Output::Language("en".into())));
        assert_eq!(plays(&out), vec!["screening"]);
        h(&mut e, Input::PlayDone);
        // Silence at screening goes to the main menu, never to 911.
        let out = h(&mut e, Input::Timeout);
        assert_eq!(plays(&out), vec!["main_menu"]);
        assert!(!out.iter().any(|o| matches!(o, Output::Emergency { .. })));
    }

    #[test]
    fn spanish_choice_switches_language() {
        let mut e = engine();
        h(&mut e, Input::Start);
        let out = keys(&mut e, "2");
        assert!(out.contains(&Output::Language("es".into())));
        assert_eq!(e.language(), "es");
    }

    #[test]
    fn emergency_key_works_in_every_choice_menu_after_screening() {
        // At screening.
        let mut e = engine();
        h(&mut e, Input::Start);
        keys(&mut e, "1");
        let out = keys(&mut e, "9");
        assert!(
            matches!(&out.last(), Some(Output::Emergency { .. })),
            "{out:?}"
        );
        assert!(e.is_done());
        // In a submenu whose entries do not mention 9.
        let mut e = at_main();
        keys(&mut e, "1");
        let out = keys(&mut e, "9");
        let Some(Output::Emergency { menu_path, .. }) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(menu_path, "language:1 > screening:1 > main:1 > streets:9");
        // An entry marked as an emergency.
        let mut e = at_main();
        let out = keys(&mut e, "15");
        assert!(matches!(
            out.last(),
            Some(Output::Emergency { reason: Some(r), .. }) if r == "downed power lines"
        ));
    }

    #[test]
    fn nine_is_a_digit_inside_zip_entry() {
        let mut e = at_main();
        keys(&mut e, "11"); // streets, pothole: asks for the ZIP
        let out = keys(&mut e, "90210");
        assert!(!out.iter().any(|o| matches!(o, Output::Emergency { .. })));
        assert_eq!(
            plays(&out),
            vec![
                "you_entered",
                "digit_9",
                "digit_0",
                "digit_2",
                "digit_1",
                "digit_0",
                "record_description",
                "beep"
            ]
        );
    }

    #[test]
    fn the_operator_key_at_the_recording_step_takes_the_service_and_zip_to_the_operator() {
        // During the recording prompt.
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "10458");
        let out = keys(&mut e, "0");
        assert!(out.contains(&Output::StopPlayback), "{out:?}");
        let Some(Output::Queue {
            queue,
            entered: Some(entered),
            menu_path,
            ..
        }) = out.last()
        else {
            panic!("{out:?}")
        };
        assert_eq!(queue, "general");
        assert_eq!(entered.service_code, "pothole");
        assert_eq!(entered.field("zipcode"), Some("10458"));
        assert!(menu_path.ends_with("streets:1 > record:0"), "{menu_path}");
        // Nothing is filed behind the operator's back when the caller hangs up in the queue.
        assert_eq!(e.abandon(None), None);

        // While recording: the recording stops first.
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "10458");
        let out = after(&mut e, 12.0, Input::PlayDone);
        assert!(matches!(out[..], [Output::StartRecording { .. }]));
        let out = after(&mut e, 3.0, Input::Digit('0'));
        assert!(out.contains(&Output::StopRecording), "{out:?}");
        assert!(
            matches!(out.last(), Some(Output::Queue { entered: Some(x), .. }) if x.field("zipcode") == Some("10458")),
            "{out:?}"
        );
        // The recording's end arriving after is not a ticket.
        let out = h(&mut e, Input::Recorded { media_url: None });
        assert!(
            !out.iter().any(|o| matches!(o, Output::FileTicket(_))),
            "{out:?}"
        );
    }

    #[test]
    fn a_request_given_up_after_wrong_zips_takes_its_service_to_the_operator() {
        let mut e = at_main();
        let out = keys(&mut e, "0");
        assert!(
            matches!(out.last(), Some(Output::Queue { entered: None, .. })),
            "from a menu, nothing was entered: {out:?}"
        );
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "12#");
        keys(&mut e, "12#");
        let out = keys(&mut e, "12#");
        assert!(
            matches!(out.last(), Some(Output::Queue { entered: Some(x), .. }) if x.service_code == "pothole" && x.field("zipcode").is_none()),
            "{out:?}"
        );
    }

    #[test]
    fn pothole_ticket_flow_with_zip_recording_and_read_back() {
        let mut e = at_main();
        let out = keys(&mut e, "1");
        assert_eq!(plays(&out), vec!["streets_menu"]);
        let out = keys(&mut e, "1");
        assert_eq!(plays(&out), vec!["enter_zip"]);
        h(&mut e, Input::PlayDone);
        let out = keys(&mut e, "12345");
        let mut heard = vec!["you_entered".to_owned()];
        heard.extend(say::digits("12345"));
        heard.extend(["record_description".to_owned(), "beep".to_owned()]);
        assert_eq!(
            plays(&out),
            heard,
            "the ZIP read back, then the recording prompt"
        );
        let out = after(&mut e, 12.0, Input::PlayDone);
        assert!(matches!(out[..], [Output::StartRecording { .. }]));
        let out = after(&mut e, 10.0, Input::Digit('#'));
        assert!(out.contains(&Output::StopRecording));
        let out = h(
            &mut e,
            Input::Recorded {
                media_url: Some("file:///r/1.wav".into()),
            },
        );
        let Some(Output::FileTicket(t)) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(t.service_code, "pothole");
        assert_eq!(t.field("zipcode"), Some("12345"));
        assert_eq!(t.media_url.as_deref(), Some("file:///r/1.wav"));
        assert_eq!(t.language, "en");
        assert_eq!(t.menu_path, "language:1 > screening:1 > main:1 > streets:1");
        // Nothing is read back until the ticket is committed; the number is read digit by
        // digit, in two groups of four.
        let out = h(&mut e, Input::TicketFiled { id: 12345678 });
        let p = plays(&out);
        let number = say::digits_grouped("12345678", 4);
        assert_eq!(number[4], say::PAUSE);
        assert_eq!(p[0], "ticket_filed");
        assert_eq!(&p[1..10], &number[..]);
        assert_eq!(p[10], "ticket_again");
        assert_eq!(&p[11..20], &number[..]);
        assert_eq!(p[20], "after_ticket");
        h(&mut e, Input::PlayDone);
        let out = keys(&mut e, "1");
        assert_eq!(plays(&out), vec!["main_menu_short"]);
    }

    #[test]
    fn bad_zip_is_asked_again_then_exhausts_to_the_operator() {
        let mut e = at_main();
        keys(&mut e, "11");
        let out = keys(&mut e, "12#");
        assert_eq!(plays(&out), vec!["invalid_zip", "enter_zip"]);
        keys(&mut e, "1#");
        let out = keys(&mut e, "#");
        assert!(
            matches!(out.last(), Some(Output::Queue { queue, .. }) if queue == "general"),
            "{out:?}"
        );
        // No operator queue yet: offered a general ticket instead.
        let out = h(&mut e, Input::QueueUnavailable);
        assert_eq!(
            plays(&out),
            vec!["operator_unavailable", "offer_general_ticket"]
        );
        let out = keys(&mut e, "1");
        assert_eq!(plays(&out), vec!["enter_zip"]);
    }

    #[test]
    fn skip_description_by_pressing_pound_during_the_prompt() {
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "12345");
        // "... To skip, press pound now": well after the ZIP's own pound could have come.
        let out = after(&mut e, 8.0, Input::Digit('#'));
        let Some(Output::FileTicket(t)) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(t.media_url, None);
    }

    #[test]
    fn failures_and_timeouts_run_out_to_the_queue() {
        let mut e = at_main();
        let out = keys(&mut e, "7");
        assert_eq!(plays(&out), vec!["invalid_entry", "main_menu_short"]);
        keys(&mut e, "8");
        let out = keys(&mut e, "7");
        assert!(matches!(out.last(), Some(Output::Queue { .. })), "{out:?}");

        let mut e = at_main();
        let out = h(&mut e, Input::Timeout);
        assert_eq!(plays(&out), vec!["no_entry", "main_menu_short"]);
        h(&mut e, Input::PlayDone);
        h(&mut e, Input::Timeout);
        h(&mut e, Input::PlayDone);
        let out = h(&mut e, Input::Timeout);
        assert!(matches!(out.last(), Some(Output::Queue { .. })), "{out:?}");
    }

    #[test]
    fn stale_timeouts_are_ignored() {
        let mut e = at_main();
        keys(&mut e, "1"); // now in streets, greeting playing, not waiting
        assert!(h(&mut e, Input::Timeout).is_empty());
    }

    #[test]
    fn type_ahead_across_menus_skips_greetings() {
        let mut e = engine();
        h(&mut e, Input::Start);
        // Everything typed during the language prompt: English, continue, streets, pothole.
        let out = keys(&mut e, "1111");
        assert_eq!(
            plays(&out),
            vec!["screening", "main_menu", "streets_menu", "enter_zip"]
        );
        assert!(out.contains(&Output::StopPlayback));
    }

    #[test]
    fn keys_typed_while_filing_do_not_skip_the_number() {
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "12345");
        after(&mut e, 8.0, Input::Digit('#'));
        assert!(keys(&mut e, "1").is_empty());
        let out = h(&mut e, Input::TicketFiled { id: 10000001 });
        assert_eq!(plays(&out).last().map(String::as_str), Some("after_ticket"));
        assert_eq!(plays(&out).len(), 21, "the whole number, twice, in groups");
    }

    #[test]
    fn repeat_back_and_info() {
        let mut e = at_main();
        assert_eq!(plays(&keys(&mut e, "*")), vec!["main_menu_short"]);
        keys(&mut e, "1");
        assert_eq!(plays(&keys(&mut e, "#")), vec!["main_menu_short"]);
        assert_eq!(plays(&keys(&mut e, "3")), vec!["recycling_info"]);
        assert_eq!(plays(&h(&mut e, Input::PlayDone)), vec!["main_menu_short"]);
    }

    #[test]
    fn top_goes_to_the_main_menu_and_hangup_says_goodbye_first() {
        let mut e = at_main();
        keys(&mut e, "1");
        assert_eq!(plays(&keys(&mut e, "7")), vec!["main_menu_short"]);
        assert_eq!(e.current_menu(), Some("main"));
        keys(&mut e, "1");
        let out = keys(&mut e, "8");
        assert_eq!(plays(&out), vec!["goodbye"]);
        assert!(!out.contains(&Output::Hangup), "the goodbye is heard first");
        assert_eq!(h(&mut e, Input::PlayDone), vec![Output::Hangup]);
    }

    #[test]
    fn status_lookup() {
        let mut e = at_main();
        assert_eq!(plays(&keys(&mut e, "6")), vec!["enter_ticket_number"]);
        let out = keys(&mut e, "12345678");
        assert_eq!(out.last(), Some(&Output::LookupTicket(12345678)));
        let out = h(
            &mut e,
            Input::Status(StatusResult::Found {
                open: true,
                days_since_update: 3,
                filed: false,
                notes: false,
            }),
        );
        assert_eq!(
            plays(&out),
            vec![
                "ticket_status_open",
                "ticket_last_update",
                "num_3",
                "updated_days_ago_post"
            ]
        );
        assert_eq!(plays(&h(&mut e, Input::PlayDone)), vec!["main_menu_short"]);
        keys(&mut e, "6");
        keys(&mut e, "99999999");
        let out = h(&mut e, Input::Status(StatusResult::NotFound));
        assert_eq!(plays(&out), vec!["ticket_not_found"]);
    }

    #[test]
    fn status_lookup_speaks_the_date_and_the_notes_when_rendered() {
        let mut e = at_main();
        keys(&mut e, "6");
        keys(&mut e, "12345678");
        let out = h(
            &mut e,
            Input::Status(StatusResult::Found {
                open: false,
                days_since_update: 1,
                filed: true,
                notes: true,
            }),
        );
        assert_eq!(
            plays(&out),
            vec![
                "ticket_status_closed",
                say::SPOKEN_FILED,
                "updated_yesterday",
                say::SPOKEN_NOTES
            ]
        );
    }

    #[test]
    fn database_failure_apologises_and_offers_the_operator() {
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "12345");
        after(&mut e, 8.0, Input::Digit('#'));
        let out = h(&mut e, Input::TicketFailed);
        assert_eq!(plays(&out), vec!["db_error"]);
        assert!(matches!(out.last(), Some(Output::Queue { .. })));
        // No operator either: told to call again, never offered another ticket.
        let out = h(&mut e, Input::QueueUnavailable);
        assert_eq!(plays(&out), vec!["call_again_later"]);
        assert_eq!(h(&mut e, Input::PlayDone), vec![Output::Hangup]);
    }

    #[test]
    fn hanging_up_mid_recording_still_files_when_the_zip_was_given() {
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "12345");
        h(&mut e, Input::PlayDone); // recording starts
        let t = e
            .abandon(Some("file:///partial.wav".into()))
            .expect("ticket kept");
        assert_eq!(t.field("zipcode"), Some("12345"));
        assert_eq!(t.media_url.as_deref(), Some("file:///partial.wav"));
        // Before the ZIP: nothing to file.
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "123");
        assert_eq!(e.abandon(None), None);
    }

    /// At the main menu in `lang` (1 English, 2 Spanish), then streets, pothole: asked for the
    /// ZIP, its prompt played.
    fn asked_for_the_zip(language_key: &str) -> Engine {
        let mut e = engine();
        h(&mut e, Input::Start);
        keys(&mut e, language_key);
        keys(&mut e, "1");
        keys(&mut e, "11");
        after(&mut e, 4.0, Input::PlayDone);
        e
    }

    /// A caller who does what the ZIP prompt says (`1 0 4 5 8 #`, a key every 200 ms): the
    /// pound belongs to the ZIP and the recording prompt plays on, in either language.
    #[test]
    fn the_zip_prompts_pound_is_consumed_by_the_zip_and_the_description_is_recorded() {
        for (key, lang) in [("1", "en"), ("2", "es")] {
            let mut e = asked_for_the_zip(key);
            assert_eq!(e.language(), lang);
            let mut out = Vec::new();
            for d in "10458".chars() {
                out = after(&mut e, 0.2, Input::Digit(d));
            }
            assert!(plays(&out).contains(&"record_description".to_owned()));
            let out = after(&mut e, 0.2, Input::Digit('#'));
            assert!(out.is_empty(), "{lang}: the pound is the ZIP's: {out:?}");
            // The read-back and the prompt play to the end; then the recording.
            let out = after(&mut e, 11.0, Input::PlayDone);
            assert!(
                matches!(out[..], [Output::StartRecording { .. }]),
                "{lang}: {out:?}"
            );
            let out = after(&mut e, 6.0, Input::Digit('#'));
            assert!(out.contains(&Output::StopRecording), "{lang}: {out:?}");
            let out = h(
                &mut e,
                Input::Recorded {
                    media_url: Some("/recordings/a.wav".into()),
                },
            );
            let Some(Output::FileTicket(t)) = out.last() else {
                panic!("{lang}: {out:?}")
            };
            assert_eq!(t.field("zipcode"), Some("10458"));
            assert_eq!(t.media_url.as_deref(), Some("/recordings/a.wav"));
            assert_eq!(t.language, lang);
        }
    }

    /// The claim lasts the inter-digit timeout (3 s in the test menu's defaults) and only for
    /// the terminator, once: later, or after another key, `#` is the next step's key again.
    #[test]
    fn the_claim_on_the_terminator_is_short_and_single() {
        let mut e = asked_for_the_zip("1");
        keys(&mut e, "10458");
        let out = after(&mut e, 3.5, Input::Digit('#'));
        assert!(
            matches!(out.last(), Some(Output::FileTicket(t)) if t.media_url.is_none()),
            "pressed at the recording prompt, pound skips the description: {out:?}"
        );

        let mut e = asked_for_the_zip("1");
        keys(&mut e, "10458");
        assert!(after(&mut e, 0.3, Input::Digit('#')).is_empty());
        let out = after(&mut e, 0.3, Input::Digit('#'));
        assert!(
            matches!(out.last(), Some(Output::FileTicket(_))),
            "a second pound is the caller skipping: {out:?}"
        );

        // An entry ended early by its terminator claims nothing.
        let mut e = at_main();
        keys(&mut e, "6");
        keys(&mut e, "1234567#");
        let out = after(&mut e, 0.2, Input::Digit('#'));
        assert!(
            plays(&out).contains(&"enter_ticket_number".to_owned()),
            "a short number is asked again, and the pound is an empty entry: {out:?}"
        );
    }

    /// A full-length entry that does not match is asked again; its pound is not a second,
    /// empty try.
    #[test]
    fn the_pound_after_an_invalid_full_entry_is_not_another_try() {
        let mut e = at_main();
        keys(&mut e, "6");
        // Status numbers are 8 digits of 0-9: `A` makes a full entry invalid.
        let out = keys(&mut e, "1234567A");
        assert_eq!(plays(&out), vec!["ticket_not_found", "enter_ticket_number"]);
        assert!(after(&mut e, 0.2, Input::Digit('#')).is_empty());
        let out = keys(&mut e, "1234567A");
        assert_eq!(
            plays(&out),
            vec!["ticket_not_found", "enter_ticket_number"],
            "second try, not the third"
        );
    }

    /// Collect → collect: the first entry's pound does not end the second empty, and digits
    /// typed ahead still go to the second.
    #[test]
    fn collect_then_collect() {
        let mut e = at_main();
        keys(&mut e, "12");
        h(&mut e, Input::PlayDone);
        let out = keys(&mut e, "94103");
        assert_eq!(
            plays(&out).last().map(String::as_str),
            Some("enter_pole_number")
        );
        assert!(after(&mut e, 0.2, Input::Digit('#')).is_empty());
        let out = keys(&mut e, "4711#");
        let Some(Output::FileTicket(t)) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(t.field("zipcode"), Some("94103"));
        assert_eq!(t.field("address"), Some("4711"));

        // Typed ahead in one go: the pound between the entries is the ZIP's.
        let mut e = at_main();
        let out = keys(&mut e, "1294103#4711#");
        let Some(Output::FileTicket(t)) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(t.field("address"), Some("4711"));
    }

    /// Collect → menu: the pound after a full request number is not "back" in the menu that
    /// follows the status.
    #[test]
    fn collect_then_menu() {
        let mut e = at_main();
        keys(&mut e, "6");
        let out = keys(&mut e, "12345678");
        assert_eq!(out.last(), Some(&Output::LookupTicket(12345678)));
        assert!(after(&mut e, 0.2, Input::Digit('#')).is_empty());
        h(&mut e, Input::Status(StatusResult::NotFound));
        let out = h(&mut e, Input::PlayDone);
        assert_eq!(plays(&out), vec!["main_menu_short"]);
        assert!(!e.menu_path().contains("main:#"), "{}", e.menu_path());
        assert_eq!(plays(&keys(&mut e, "1")), vec!["streets_menu"]);
    }

    /// Keys the step has no use for do not cut its prompt: a digit during the recording
    /// prompt (recording would never start), anything but 1 while the number is read.
    #[test]
    fn keys_a_step_does_not_take_leave_its_prompt_playing() {
        let mut e = asked_for_the_zip("1");
        keys(&mut e, "10458");
        assert!(after(&mut e, 4.0, Input::Digit('5')).is_empty());
        let out = h(&mut e, Input::PlayDone);
        assert!(
            matches!(out[..], [Output::StartRecording { .. }]),
            "{out:?}"
        );
        after(&mut e, 5.0, Input::Digit('#'));
        // Recording ended by the key; the caller presses it again as it ends.
        h(&mut e, Input::Recorded { media_url: None });
        assert!(after(&mut e, 0.3, Input::Digit('#')).is_empty());
        let out = h(&mut e, Input::TicketFiled { id: 12345678 });
        assert_eq!(plays(&out).len(), 21);
        assert!(keys(&mut e, "7#").is_empty(), "the number is read on");
        let out = keys(&mut e, "1");
        assert!(out.contains(&Output::StopPlayback));
        assert_eq!(plays(&out), vec!["main_menu_short"]);
    }

    /// After a recording that silence ended, the end key pressed within the window is the
    /// caller finishing it, not a key for what follows.
    #[test]
    fn the_end_key_just_after_silence_ended_the_recording_is_consumed() {
        let mut e = asked_for_the_zip("1");
        keys(&mut e, "10458");
        after(&mut e, 11.0, Input::PlayDone);
        after(&mut e, 20.0, Input::Recorded { media_url: None });
        assert!(after(&mut e, 0.5, Input::Digit('#')).is_empty());
        assert!(e.pending.is_empty());
    }

    #[test]
    fn status_reads_days_as_a_number_in_the_callers_language() {
        for (key, lang, days, want) in [
            (
                "1",
                "en",
                12u32,
                vec!["ticket_last_update", "num_12", "updated_days_ago_post"],
            ),
            (
                "2",
                "es",
                21,
                vec!["ticket_last_update", "num_21_m", "updated_days_ago_post"],
            ),
            ("2", "es", 1, vec!["updated_yesterday"]),
            ("1", "en", 0, vec!["updated_today"]),
        ] {
            let mut e = engine();
            h(&mut e, Input::Start);
            keys(&mut e, key);
            keys(&mut e, "1");
            keys(&mut e, "6");
            keys(&mut e, "12345678");
            let out = h(
                &mut e,
                Input::Status(StatusResult::Found {
                    open: false,
                    days_since_update: days,
                    filed: false,
                    notes: false,
                }),
            );
            let mut p = plays(&out);
            assert_eq!(p.remove(0), "ticket_status_closed");
            assert_eq!(p, want, "{lang} {days}");
        }
    }

    const HOURS_MENU: &str = r#"
languages: [en]
start: screening
screening: screening
schedules:
  centre:
    time_zone: America/New_York
    open: {mon-fri: "07:00-19:00"}
    closed_dates: ["2026-12-25"]
menus:
  screening:
    greet_long: screening
    on_timeout: {goto: main}
    entries:
      "1": {goto: main}
      "9": emergency
  main:
    greet_long: main_menu
    on_timeout: {when: {schedule: centre, open: {queue: general}, closed: repeat}}
    entries:
      "0": {when: {schedule: centre, open: {queue: general}, closed: {goto: after_hours}}}
      "9": emergency
  after_hours:
    greet_long: after_hours
    entries:
      "1": top
      "9": emergency
"#;

    /// At the main menu of [`HOURS_MENU`], the call answered at `wall` (its greeting played).
    fn answered_at(wall: &str) -> Engine {
        let f = parse(HOURS_MENU).unwrap();
        let today = jiff::civil::date(2026, 12, 1);
        let schedules: crate::menu::schedule::Schedules = f
            .schedules
            .iter()
            .map(|(k, v)| (k.clone(), crate::menu::schedule::compile(v, today).unwrap()))
            .collect();
        let t0 = Instant::now();
        let mut e = Engine::new(Arc::new(f), "main".into()).with_calendar(
            Arc::new(schedules),
            t0,
            wall.parse().unwrap(),
        );
        e.handle(t0, Input::Start);
        keys(&mut e, "1");
        h(&mut e, Input::PlayDone);
        assert_eq!(e.current_menu(), Some("main"));
        e
    }

    fn queued(out: &[Output]) -> bool {
        out.iter().any(|o| matches!(o, Output::Queue { .. }))
    }

    #[test]
    fn the_operator_key_follows_the_hours_as_the_call_goes_on() {
        // Monday 2026-12-07, 18:59:30 in New York (23:59:30Z): open.
        let mut e = answered_at("2026-12-07T23:59:30Z");
        assert!(queued(&after(&mut e, 20.0, Input::Digit('0'))));
        // The same call start, the key pressed 40 s later (19:00:10): closed.
        let mut e = answered_at("2026-12-07T23:59:30Z");
        let out = after(&mut e, 40.0, Input::Digit('0'));
        assert!(!queued(&out));
        assert_eq!(plays(&out), vec!["after_hours"]);
        assert_eq!(e.current_menu(), Some("after_hours"));
        // The 911 key still works there.
        let out = keys(&mut e, "9");
        assert!(out.iter().any(|o| matches!(o, Output::Emergency { .. })));
    }

    #[test]
    fn a_holiday_is_closed_and_a_timeout_can_branch_too() {
        // Friday 2026-12-25 at noon: a holiday.
        let mut e = answered_at("2026-12-25T17:00:00Z");
        let out = after(&mut e, 5.0, Input::Timeout);
        assert!(!queued(&out));
        assert_eq!(e.current_menu(), Some("main"));
        // Monday 2026-12-28 at noon: open; silence reaches the operator.
        let mut e = answered_at("2026-12-28T17:00:00Z");
        assert!(queued(&after(&mut e, 5.0, Input::Timeout)));
    }

    #[test]
    fn the_hour_after_the_spring_change_is_open() {
        // Monday 2027-03-15 07:30 EDT is 11:30Z (it would be 06:30 in standard time).
        let mut e = answered_at("2027-03-15T11:30:00Z");
        assert!(queued(&keys(&mut e, "0")));
    }

    fn asked_for_the_house_number() -> Engine {
        let menu = MENU.replace(
            "      \"5\": {emergency: {reason: downed power lines}}",
            "      \"3\": {ticket: {service: tree, name: Tree, house_number: true}}\n      \
             \"5\": {emergency: {reason: downed power lines}}",
        );
        let mut e = Engine::new(Arc::new(parse(&menu).unwrap()), "main".into());
        h(&mut e, Input::Start);
        keys(&mut e, "1113");
        after(&mut e, 4.0, Input::PlayDone);
        let out = keys(&mut e, "10458");
        let p = plays(&out);
        assert_eq!(p.first().map(String::as_str), Some("you_entered"), "{p:?}");
        assert_eq!(
            p.last().map(String::as_str),
            Some("enter_house_number"),
            "{p:?}"
        );
        e
    }

    fn recorded_ticket(e: &mut Engine) -> TicketRequest {
        let out = after(e, 11.0, Input::PlayDone);
        assert!(
            matches!(out[..], [Output::StartRecording { .. }]),
            "{out:?}"
        );
        after(e, 3.0, Input::Digit('#'));
        let out = h(
            e,
            Input::Recorded {
                media_url: Some("/recordings/a.wav".into()),
            },
        );
        match out.last() {
            Some(Output::FileTicket(t)) => t.clone(),
            _ => panic!("{out:?}"),
        }
    }

    #[test]
    fn a_house_number_after_the_zip_is_kept_and_the_recording_asks_for_the_street() {
        let mut e = asked_for_the_house_number();
        let out = after(&mut e, 3.5, Input::Digit('4'));
        assert!(plays(&out).is_empty(), "{out:?}");
        keys(&mut e, "21");
        let out = after(&mut e, 0.2, Input::Digit('#'));
        assert_eq!(
            plays(&out),
            [
                "you_entered",
                "digit_4",
                "digit_2",
                "digit_1",
                "record_street",
                "beep"
            ]
        );
        let t = recorded_ticket(&mut e);
        assert_eq!(t.field("zipcode"), Some("10458"));
        assert_eq!(t.field("house_number"), Some("421"));
    }

    #[test]
    fn pound_alone_skips_the_house_number() {
        let mut e = asked_for_the_house_number();
        let out = after(&mut e, 3.5, Input::Digit('#'));
        assert_eq!(plays(&out), ["record_street", "beep"]);
        let t = recorded_ticket(&mut e);
        assert_eq!(t.field("zipcode"), Some("10458"));
        assert_eq!(t.field("house_number"), None);
    }
}
