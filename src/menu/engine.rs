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
//! - **911 everywhere**: after the language choice, the emergency key (default `9`) redirects
//!   to 911 from every choice menu, whatever the menu's entries say; digit entry (ZIP code,
//!   request number) and recording take keys literally.
//! - `*` repeats the menu (short greeting), `#` goes back; three invalid keys or three silent
//!   waits run the menu's `on_exhausted` action (default: the operator queue).
//! - Until an operator queue exists the call answers [`Input::QueueUnavailable`] and the caller
//!   is offered a general service request instead, so nobody waits on hold forever.

use crate::menu::schema::{Action, Collect, MenuFile, Record, TicketAction, TicketSteps};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// The service code of the general request offered when no operator can take the call.
pub const GENERAL_SERVICE: &str = "general";
/// Its name.
pub const GENERAL_SERVICE_NAME: &str = "General service request";
/// How many digits a service request number has.
pub const TICKET_DIGITS: usize = 8;

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
}

/// A looked-up request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusResult {
    NotFound,
    Found {
        open: bool,
        days_since_update: u32,
    },
    /// The database could not be read.
    Failed,
}

/// A service request ready to be filed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TicketRequest {
    pub service_code: String,
    pub service_name: String,
    pub agency: Option<String>,
    pub description: Option<String>,
    /// Collected fields (`zipcode`, `address`...).
    pub fields: Vec<(String, String)>,
    pub media_url: Option<String>,
    pub language: String,
    /// How the caller got here, e.g. `language:1 > screening:1 > main:1 > streets:1`.
    pub menu_path: String,
}

impl TicketRequest {
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
    /// Put the caller in an operator queue (answer `QueueUnavailable` if there is none).
    Queue {
        queue: String,
        skill: Option<String>,
        menu_path: String,
    },
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
    /// Handed over (911, queue) or hung up: inputs are ignored.
    Done,
}

/// Why digits are being collected.
#[derive(Debug, Clone, PartialEq)]
enum Purpose {
    TicketField { index: usize },
    TicketNumber,
}

/// A ticket being put together.
#[derive(Debug, Clone)]
struct Draft {
    req: TicketRequest,
    steps: TicketSteps,
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
    draft: Option<Draft>,
    /// The ticket could not be saved: do not offer another ticket.
    db_failed: bool,
    out: Vec<Output>,
    /// Per-call figures for metrics.
    stats: EngineStats,
}

/// What one caller did, for metrics: invalid keys and silent waits per menu, information heard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub invalid: std::collections::BTreeMap<String, u32>,
    pub timeouts: std::collections::BTreeMap<String, u32>,
    pub heard_info: bool,
    pub menus: Vec<String>,
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
            draft: None,
            db_failed: false,
            out: Vec::new(),
            stats: EngineStats::default(),
        }
    }

    /// Invalid keys, timeouts and menus visited so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn language(&self) -> &str {
        &self.language
    }

    /// The menu path so far, `menu:key > menu:key ...`.
    pub fn menu_path(&self) -> String {
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
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The caller hung up. If a ticket had all its digit fields (the description is optional),
    /// it is returned so the call can still file it, with whatever recording was kept.
    pub fn abandon(&mut self, media_url: Option<String>) -> Option<TicketRequest> {
        let draft = self.draft.take()?;
        let complete = match &self.state {
            State::Record { .. } => true,
            State::Collect {
                purpose: Purpose::TicketField { index },
                ..
            } => *index >= draft.steps.collect.len(),
            _ => false,
        };
        self.state = State::Done;
        complete.then(|| {
            let mut req = draft.req;
            req.media_url = media_url.or(req.media_url);
            req
        })
    }

    /// Feed one input; returns what to do, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Output> {
        match input {
            Input::Start => {
                let start = self.menu.start.clone();
                self.enter_menu(&start, true);
            }
            Input::Digit(d) => {
                self.pending.push_back(d);
                self.drain();
            }
            Input::PlayDone => self.on_play_done(),
            Input::Timeout => self.on_timeout(),
            Input::Recorded { media_url } => self.on_recorded(media_url),
            Input::TicketFiled { id } => self.on_filed(id),
            Input::TicketFailed => self.on_file_failed(),
            Input::Status(r) => self.on_status(r),
            Input::QueueUnavailable => self.on_queue_unavailable(),
        }
        std::mem::take(&mut self.out)
    }

    fn emit(&mut self, o: Output) {
        self.out.push(o);
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
            self.emit(Output::StopPlayback);
            self.emit(Output::Timer(None));
            self.on_key(d);
        }
    }

    fn accepts_keys(&self) -> bool {
        !matches!(
            self.state,
            State::Idle | State::Filing | State::LookingUp | State::Goodbye | State::Done
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
            State::Idle | State::Filing | State::LookingUp | State::Goodbye | State::Done => {}
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
                };
                self.start_collect(Purpose::TicketNumber, spec);
            }
            Action::Queue(q) => {
                self.state = State::Done;
                let menu_path = self.menu_path();
                self.emit(Output::Queue {
                    queue: q.queue,
                    skill: q.skill,
                    menu_path,
                });
            }
            Action::Emergency(e) => self.emergency(e.reason),
            Action::Hangup => self.goodbye(),
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
        self.emit(Output::Queue {
            queue: "general".into(),
            skill: None,
            menu_path,
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
        self.draft = Some(Draft {
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
        self.next_ticket_step(0);
    }

    fn next_ticket_step(&mut self, index: usize) {
        let Some(draft) = &self.draft else { return };
        if let Some(spec) = draft.steps.collect.get(index).cloned() {
            self.start_collect(Purpose::TicketField { index }, spec);
            return;
        }
        match draft.steps.record.clone() {
            Some(spec) => {
                let mut prompts = vec![spec.prompt.clone()];
                prompts.extend(spec.beep.clone());
                self.state = State::Record {
                    spec,
                    recording: false,
                };
                self.play(prompts);
            }
            None => {
                self.state = State::Filing;
                self.file_draft(None);
            }
        }
    }

    fn start_collect(&mut self, purpose: Purpose, spec: Collect) {
        let prompt = spec.prompt.clone();
        self.state = State::Collect {
            purpose,
            spec,
            digits: String::new(),
            tries: 0,
            waiting: false,
        };
        if self.pending.is_empty() {
            self.play(vec![prompt]);
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
        let inter = self.defaults().inter_digit_timeout_seconds;
        if full {
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
                Purpose::TicketField { index } => {
                    if let Some(d) = &mut self.draft {
                        d.req.fields.push((spec.field.clone(), digits));
                    }
                    self.next_ticket_step(index + 1);
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
                Purpose::TicketField { index } if spec.optional => self.next_ticket_step(index + 1),
                Purpose::TicketNumber => {
                    // Could not get a number: back to the main menu.
                    self.play(vec![spec.invalid_prompt.clone()]);
                    self.stack.clear();
                    let main = self.main.clone();
                    self.enter_menu(&main, false);
                }
                Purpose::TicketField { .. } => {
                    self.draft = None;
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
        if let State::Record { .. } = self.state {
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
        let digits = number_prompts(id);
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
        self.draft = None;
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
        let prompts = match r {
            StatusResult::NotFound => vec!["ticket_not_found".to_owned()],
            StatusResult::Failed => vec!["db_error".to_owned()],
            StatusResult::Found {
                open,
                days_since_update,
            } => {
                let mut v = vec![if open {
                    "ticket_status_open".to_owned()
                } else {
                    "ticket_status_closed".to_owned()
                }];
                if days_since_update == 0 {
                    v.push("updated_today".into());
                } else {
                    v.push("updated_days_ago_pre".into());
                    v.extend(number_prompts(days_since_update as u64));
                    v.push("updated_days_ago_post".into());
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

/// `digit_N` prompts that read a number digit by digit.
pub fn number_prompts(n: u64) -> Vec<String> {
    n.to_string()
        .chars()
        .map(|c| format!("digit_{c}"))
        .collect()
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

    fn keys(e: &mut Engine, ks: &str) -> Vec<Output> {
        ks.chars().flat_map(|k| e.handle(Input::Digit(k))).collect()
    }

    /// Start, pick English, pass screening: now at the main menu with its greeting played.
    fn at_main() -> Engine {
        let mut e = engine();
        e.handle(Input::Start);
        keys(&mut e, "11");
        e.handle(Input::PlayDone);
        assert_eq!(e.current_menu(), Some("main"));
        e
    }

    #[test]
    fn start_plays_language_menu_and_timeout_picks_english() {
        let mut e = engine();
        assert_eq!(plays(&e.handle(Input::Start)), vec!["language_menu"]);
        let out = e.handle(Input::PlayDone);
        assert!(matches!(out[..], [Output::Timer(Some(_))]));
        let out = e.handle(Input::Timeout);
        assert!(out.contains(&Output::Language("en".into())));
        assert_eq!(plays(&out), vec!["screening"]);
        e.handle(Input::PlayDone);
        // Silence at screening goes to the main menu, never to 911.
        let out = e.handle(Input::Timeout);
        assert_eq!(plays(&out), vec!["main_menu"]);
        assert!(!out.iter().any(|o| matches!(o, Output::Emergency { .. })));
    }

    #[test]
    fn spanish_choice_switches_language() {
        let mut e = engine();
        e.handle(Input::Start);
        let out = keys(&mut e, "2");
        assert!(out.contains(&Output::Language("es".into())));
        assert_eq!(e.language(), "es");
    }

    #[test]
    fn emergency_key_works_in_every_choice_menu_after_screening() {
        // At screening.
        let mut e = engine();
        e.handle(Input::Start);
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
        assert_eq!(plays(&out), vec!["record_description", "beep"]);
    }

    #[test]
    fn pothole_ticket_flow_with_zip_recording_and_read_back() {
        let mut e = at_main();
        let out = keys(&mut e, "1");
        assert_eq!(plays(&out), vec!["streets_menu"]);
        let out = keys(&mut e, "1");
        assert_eq!(plays(&out), vec!["enter_zip"]);
        e.handle(Input::PlayDone);
        let out = keys(&mut e, "12345");
        assert_eq!(plays(&out), vec!["record_description", "beep"]);
        let out = e.handle(Input::PlayDone);
        assert!(matches!(out[..], [Output::StartRecording { .. }]));
        let out = keys(&mut e, "#");
        assert!(out.contains(&Output::StopRecording));
        let out = e.handle(Input::Recorded {
            media_url: Some("file:///r/1.wav".into()),
        });
        let Some(Output::FileTicket(t)) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(t.service_code, "pothole");
        assert_eq!(t.field("zipcode"), Some("12345"));
        assert_eq!(t.media_url.as_deref(), Some("file:///r/1.wav"));
        assert_eq!(t.language, "en");
        assert_eq!(t.menu_path, "language:1 > screening:1 > main:1 > streets:1");
        // Nothing is read back until the ticket is committed.
        let out = e.handle(Input::TicketFiled { id: 12345678 });
        let p = plays(&out);
        assert_eq!(p[0], "ticket_filed");
        assert_eq!(&p[1..9], &number_prompts(12345678)[..]);
        assert_eq!(p[9], "ticket_again");
        assert_eq!(&p[10..18], &number_prompts(12345678)[..]);
        assert_eq!(p[18], "after_ticket");
        e.handle(Input::PlayDone);
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
        let out = e.handle(Input::QueueUnavailable);
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
        let out = keys(&mut e, "#");
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
        let out = e.handle(Input::Timeout);
        assert_eq!(plays(&out), vec!["no_entry", "main_menu_short"]);
        e.handle(Input::PlayDone);
        e.handle(Input::Timeout);
        e.handle(Input::PlayDone);
        let out = e.handle(Input::Timeout);
        assert!(matches!(out.last(), Some(Output::Queue { .. })), "{out:?}");
    }

    #[test]
    fn stale_timeouts_are_ignored() {
        let mut e = at_main();
        keys(&mut e, "1"); // now in streets, greeting playing, not waiting
        assert!(e.handle(Input::Timeout).is_empty());
    }

    #[test]
    fn type_ahead_across_menus_skips_greetings() {
        let mut e = engine();
        e.handle(Input::Start);
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
        keys(&mut e, "#");
        assert!(keys(&mut e, "1").is_empty());
        let out = e.handle(Input::TicketFiled { id: 10000001 });
        assert_eq!(plays(&out).last().map(String::as_str), Some("after_ticket"));
        assert_eq!(plays(&out).len(), 19, "the whole number, twice");
    }

    #[test]
    fn repeat_back_and_info() {
        let mut e = at_main();
        assert_eq!(plays(&keys(&mut e, "*")), vec!["main_menu_short"]);
        keys(&mut e, "1");
        assert_eq!(plays(&keys(&mut e, "#")), vec!["main_menu_short"]);
        assert_eq!(plays(&keys(&mut e, "3")), vec!["recycling_info"]);
        assert_eq!(plays(&e.handle(Input::PlayDone)), vec!["main_menu_short"]);
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
        assert_eq!(e.handle(Input::PlayDone), vec![Output::Hangup]);
    }

    #[test]
    fn status_lookup() {
        let mut e = at_main();
        assert_eq!(plays(&keys(&mut e, "6")), vec!["enter_ticket_number"]);
        let out = keys(&mut e, "12345678");
        assert_eq!(out.last(), Some(&Output::LookupTicket(12345678)));
        let out = e.handle(Input::Status(StatusResult::Found {
            open: true,
            days_since_update: 3,
        }));
        assert_eq!(
            plays(&out),
            vec![
                "ticket_status_open",
                "updated_days_ago_pre",
                "digit_3",
                "updated_days_ago_post"
            ]
        );
        assert_eq!(plays(&e.handle(Input::PlayDone)), vec!["main_menu_short"]);
        keys(&mut e, "6");
        keys(&mut e, "99999999");
        let out = e.handle(Input::Status(StatusResult::NotFound));
        assert_eq!(plays(&out), vec!["ticket_not_found"]);
    }

    #[test]
    fn database_failure_apologises_and_offers_the_operator() {
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "12345#");
        let out = e.handle(Input::TicketFailed);
        assert_eq!(plays(&out), vec!["db_error"]);
        assert!(matches!(out.last(), Some(Output::Queue { .. })));
        // No operator either: told to call again, never offered another ticket.
        let out = e.handle(Input::QueueUnavailable);
        assert_eq!(plays(&out), vec!["call_again_later"]);
        assert_eq!(e.handle(Input::PlayDone), vec![Output::Hangup]);
    }

    #[test]
    fn hanging_up_mid_recording_still_files_when_the_zip_was_given() {
        let mut e = at_main();
        keys(&mut e, "11");
        keys(&mut e, "12345");
        e.handle(Input::PlayDone); // recording starts
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
}
