//! The menu language admins edit (`menus/*.yaml`), as serde types. This is the only place that
//! knows `serde_yaml` exists, so swapping it for a maintained fork is a one-line change.
//!
//! The vocabulary follows what contact-centre admins know from FreeSWITCH IVR menus, in plain
//! YAML: greet-long and greet-short (`greet_long`, `greet_short`), invalid-sound
//! (`invalid_prompt`), timeout (`timeout_seconds`), inter-digit-timeout
//! (`inter_digit_timeout_seconds`), max-failures and max-timeouts, and digit-len with its
//! terminators (a ticket's `collect` steps: `min_digits`/`max_digits`, `terminator`).
//! FreeSWITCH's confirm-macro/confirm-key (confirming an entry before it is used) has no
//! counterpart here: a digit entry is read back ("You entered ...", `read_back`) and not
//! confirmed. A menu file looks like:
//!
//! ```yaml
//! languages: [en, es]          # the first is the default
//! start: language              # the first menu (language choice)
//! screening: screening         # the menu that tells callers about 911 (checked by `ivr311 check`)
//! defaults:
//!   timeout_seconds: 5         # wait for the first key after the greeting ends
//!   inter_digit_timeout_seconds: 3
//!   max_failures: 3            # invalid keys before `on_exhausted`
//!   max_timeouts: 3            # silent waits before `on_exhausted`
//!   on_exhausted: {queue: general}
//!   repeat_key: "*"
//!   back_key: "#"
//!   emergency_key: "9"         # works in every choice menu after screening
//! menus:
//!   main:
//!     greet_long: main_menu
//!     greet_short: main_menu_short
//!     entries:
//!       "1": {goto: streets}
//!       "6": status
//!       "0": {queue: general}
//!       "9": emergency
//!   streets:
//!     category: Streets and infrastructure
//!     greet_long: streets_menu
//!     entries:
//!       "1": {ticket: {service: pothole, name: Pothole, description: "A pothole in a city street"}}
//!       "5": {emergency: {reason: downed power lines}}
//! ```
//!
//! Top-level options for callers who already filed: `repeat_callers: true` (tell a caller
//! their open request after screening) and `duplicates: {days: N}` (offer to join an open
//! request of the same service at the same ZIP code; also per ticket).
//!
//! Actions are written as a one-key map (`{goto: streets}`) or, when they take nothing, as a
//! plain word (`emergency`, `back`, `status`). Semantic checks (dangling menus, unreachable
//! menus, shadowed emergency key, missing prompts...) live in [`crate::menu::validate`].

use serde::Deserialize;
use std::collections::BTreeMap;

/// A whole menu file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MenuFile {
    /// Languages callers can choose; the first is the default.
    pub languages: Vec<String>,
    /// The first menu a caller hears (normally the language choice).
    pub start: String,
    /// The 911 screening menu: heard right after the language choice.
    pub screening: String,
    #[serde(default)]
    pub defaults: Defaults,
    /// Opening hours by name, for `when` actions (see [`crate::menu::schedule`]).
    #[serde(default)]
    pub schedules: BTreeMap<String, ScheduleSpec>,
    /// Menus by id.
    pub menus: BTreeMap<String, Menu>,
    /// After screening, tell a caller whose number has an open request its number and age,
    /// and offer its status (never for a withheld or anonymous number). Default false.
    #[serde(default)]
    pub repeat_callers: bool,
    /// Look for an open request of the same service at the same ZIP code before filing one,
    /// for every ticket that does not set its own `duplicates`. Default: none (no check).
    #[serde(default)]
    pub duplicates: Option<Duplicates>,
}

/// A duplicate check: a request of the same service at the same ZIP code, open and filed
/// within the last `days`, is offered to the caller instead of a new one.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Duplicates {
    /// How far back an open request counts, in days (1 to 365).
    pub days: u32,
}

/// Settings every menu inherits unless it sets its own.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    /// Seconds to wait for the first key after the greeting ends. Default 5.
    pub timeout_seconds: f64,
    /// Seconds allowed between keys while entering digits (ZIP, request number). Default 3.
    pub inter_digit_timeout_seconds: f64,
    /// Invalid keys allowed in a menu before `on_exhausted`. Default 3.
    pub(crate) max_failures: u32,
    /// Silent waits allowed in a menu before `on_exhausted`. Default 3.
    pub(crate) max_timeouts: u32,
    /// What happens when failures or timeouts run out. Default: the operator queue `general`.
    pub(crate) on_exhausted: Action,
    /// Played after an invalid key. Default `invalid_entry`.
    pub(crate) invalid_prompt: String,
    /// Played after a silent wait. Default `no_entry`.
    pub(crate) timeout_prompt: String,
    /// Repeats the current menu. Default `*`.
    pub(crate) repeat_key: char,
    /// Goes back one menu (and ends digit entry). Default `#`.
    pub(crate) back_key: char,
    /// Redirects to 911 from every choice menu after screening. Default `9`.
    pub(crate) emergency_key: char,
    /// During a request's recording step (its prompt or the recording), takes the caller to
    /// an operator (the `on_exhausted` queue, or `general`) with what they entered so far
    /// (the service, the ZIP code), which the operator's console shows and prefills. A
    /// recording's `end_key` wins over it. `null`: no such key. Default `0`.
    pub(crate) operator_key: Option<char>,
    /// Steps every ticket takes unless it sets its own: a ZIP code and a spoken description.
    pub ticket: TicketSteps,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            timeout_seconds: 5.0,
            inter_digit_timeout_seconds: 3.0,
            max_failures: 3,
            max_timeouts: 3,
            on_exhausted: Action::Queue(QueueTarget {
                queue: "general".into(),
                skill: None,
            }),
            invalid_prompt: "invalid_entry".into(),
            timeout_prompt: "no_entry".into(),
            repeat_key: '*',
            back_key: '#',
            emergency_key: '9',
            operator_key: Some('0'),
            ticket: TicketSteps::default(),
        }
    }
}

/// One menu.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Menu {
    /// Played on entry (FreeSWITCH greet-long).
    pub greet_long: String,
    /// Played instead when the menu is repeated (greet-short). Defaults to `greet_long`.
    #[serde(default)]
    pub(crate) greet_short: Option<String>,
    /// The service group this menu's tickets belong to (Open311 `group`).
    #[serde(default)]
    pub(crate) category: Option<String>,
    #[serde(default)]
    pub(crate) timeout_seconds: Option<f64>,
    #[serde(default)]
    pub(crate) max_failures: Option<u32>,
    #[serde(default)]
    pub(crate) max_timeouts: Option<u32>,
    #[serde(default)]
    pub(crate) invalid_prompt: Option<String>,
    #[serde(default)]
    pub(crate) timeout_prompt: Option<String>,
    /// Instead of re-prompting after a silent wait, do this (e.g. the language menu picks
    /// English; the screening menu goes on to the main menu).
    #[serde(default)]
    pub on_timeout: Option<Action>,
    #[serde(default)]
    pub(crate) on_exhausted: Option<Action>,
    /// Keys and what they do.
    pub entries: BTreeMap<String, Action>,
}

/// What a key (or a timeout) does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Go to another menu.
    Goto(String),
    /// Back to the menu before this one.
    Back,
    /// Back to the main menu (the one after screening).
    Top,
    /// Play this menu again (short greeting).
    Repeat,
    /// Play an information prompt, then come back to this menu.
    Info(String),
    /// Switch the caller's language, then go to a menu.
    Language(LanguageSwitch),
    /// File a service request.
    Ticket(Box<TicketAction>),
    /// Ask for a request number and read its status.
    Status,
    /// Wait for an operator.
    Queue(QueueTarget),
    /// Redirect to 911 now (the emergency key, and entries for dangers such as gas smell).
    Emergency(EmergencyEntry),
    /// Say goodbye and hang up.
    Hangup,
    /// One action while a schedule is open, another while it is closed.
    When(Box<When>),
    /// Send the caller on to a crisis or utility line (a `transfers` entry of the server's
    /// config marked `crisis: true`), as 911 is: audited first, with the same fallback.
    Transfer(TransferTo),
}

/// The one-key-map forms of [`Action`].
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ActionMap {
    Goto(String),
    Back(Empty),
    Top(Empty),
    Repeat(Empty),
    Info(String),
    Language(LanguageSwitch),
    Ticket(Box<TicketAction>),
    Status(Empty),
    Queue(QueueTarget),
    Emergency(EmergencyEntry),
    Hangup(Empty),
    When(Box<When>),
    Transfer(TransferTo),
}

/// `{}` or nothing, for `{back: {}}`-style spellings of word actions.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

const WORDS: &[&str] = &["back", "top", "repeat", "status", "emergency", "hangup"];
const ACTIONS: &[&str] = &[
    "goto",
    "back",
    "top",
    "repeat",
    "info",
    "language",
    "ticket",
    "status",
    "queue",
    "emergency",
    "hangup",
    "when",
    "transfer",
];

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Action;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an action: a word (back, top, repeat, status, emergency, hangup) or a one-key map such as {goto: menu}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Action, E> {
                Ok(match v {
                    "back" => Action::Back,
                    "top" => Action::Top,
                    "repeat" => Action::Repeat,
                    "status" => Action::Status,
                    "emergency" => Action::Emergency(EmergencyEntry::default()),
                    "hangup" => Action::Hangup,
                    other => return Err(E::unknown_variant(other, WORDS)),
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Action, A::Error> {
                let m = ActionMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(match m {
                    ActionMap::Goto(x) => Action::Goto(x),
                    ActionMap::Back(_) => Action::Back,
                    ActionMap::Top(_) => Action::Top,
                    ActionMap::Repeat(_) => Action::Repeat,
                    ActionMap::Info(x) => Action::Info(x),
                    ActionMap::Language(x) => Action::Language(x),
                    ActionMap::Ticket(x) => Action::Ticket(x),
                    ActionMap::Status(_) => Action::Status,
                    ActionMap::Queue(x) => Action::Queue(x),
                    ActionMap::Emergency(x) => Action::Emergency(x),
                    ActionMap::Hangup(_) => Action::Hangup,
                    ActionMap::When(x) => Action::When(x),
                    ActionMap::Transfer(x) => Action::Transfer(x),
                })
            }
        }
        let _ = ACTIONS;
        d.deserialize_any(V)
    }
}

/// `{when: {schedule: call_centre, open: {queue: general}, closed: {goto: after_hours}}}`:
/// decided when the caller reaches it, by the schedule's hours at that moment.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// A name under `schedules`.
    pub schedule: String,
    /// What happens while the schedule is open.
    pub open: Action,
    /// What happens while it is closed.
    pub closed: Action,
}

/// `{transfer: {to: lifeline, announce: lifeline_unreachable}}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransferTo {
    /// The name of a `transfers` entry in the server's config, marked `crisis: true`.
    pub to: String,
    /// Said (twice) when the line cannot be reached, instead of the built-in
    /// `transfer_unreachable`; e.g. "Please hang up and dial 988".
    #[serde(default)]
    pub announce: Option<String>,
}

/// A named schedule as written; [`crate::menu::schedule::compile`] checks and compiles it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// An IANA time zone name, e.g. `America/New_York`.
    pub time_zone: String,
    /// Weekly hours: days (`mon-fri`, `sat`, `sat,sun`) to hours (`"07:00-19:00"`, several
    /// separated by commas). Days not listed are closed.
    #[serde(default)]
    pub open: BTreeMap<String, String>,
    /// Whole days closed (`"2026-12-25"`).
    #[serde(default)]
    pub closed_dates: Vec<String>,
    /// Special hours on a date, instead of that weekday's.
    #[serde(default)]
    pub open_dates: BTreeMap<String, String>,
}

/// `{language: {set: es, goto: screening}}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LanguageSwitch {
    pub set: String,
    pub goto: String,
}

/// `{queue: {queue: general, skill: es}}`, or `{queue: general}` for short.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(from = "QueueTargetRepr")]
pub struct QueueTarget {
    pub queue: String,
    pub(crate) skill: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum QueueTargetRepr {
    Name(String),
    // Unknown fields here are reported by `validate` with their exact position (an untagged
    // enum would only say "did not match any variant").
    Full {
        queue: String,
        #[serde(default)]
        skill: Option<String>,
    },
}

impl From<QueueTargetRepr> for QueueTarget {
    fn from(r: QueueTargetRepr) -> Self {
        match r {
            QueueTargetRepr::Name(queue) => QueueTarget { queue, skill: None },
            QueueTargetRepr::Full { queue, skill } => QueueTarget { queue, skill },
        }
    }
}

/// `{emergency: {reason: gas smell}}` or just `emergency`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmergencyEntry {
    /// What the danger is, for the audit log.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A service request the caller can file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TicketAction {
    /// Open311 `service_code`, e.g. `pothole`.
    pub service: String,
    /// Open311 `service_name`, e.g. `Pothole`.
    pub(crate) name: String,
    /// Open311 service `description`.
    #[serde(default)]
    pub description: Option<String>,
    /// Department that handles it (`agency_responsible`).
    #[serde(default)]
    pub agency: Option<String>,
    /// Search keywords (Open311 `keywords`).
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Steps for this service; default: the file's `defaults.ticket`.
    #[serde(default)]
    pub steps: Option<TicketSteps>,
    /// After the ZIP code, ask for the house number ([`Collect::house_number`]: optional,
    /// pound alone skips it), and ask for the street in the recording (`record_street`
    /// instead of `record_description`). Default false.
    #[serde(default)]
    pub house_number: bool,
    /// This service's duplicate check; default: the file's `duplicates`.
    #[serde(default)]
    pub duplicates: Option<Duplicates>,
}

/// What a ticket asks the caller for before filing. A `steps:` block that names only one of
/// `collect`/`record` keeps the default for the other: write `collect: []` or `record: null`
/// to drop a step.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TicketSteps {
    /// Digit entries, in order (e.g. the ZIP code).
    pub collect: Vec<Collect>,
    /// A spoken description, recorded.
    pub record: Option<Record>,
}

impl Default for TicketSteps {
    fn default() -> Self {
        TicketSteps {
            collect: vec![Collect::zipcode()],
            record: Some(Record::default()),
        }
    }
}

/// Collect digits into a ticket field (FreeSWITCH digit-len / terminators).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Collect {
    /// Ticket field: `zipcode` or `address` (address_id).
    pub field: String,
    pub(crate) prompt: String,
    /// Played when the entry does not match; then the prompt again.
    #[serde(default = "default_invalid_collect")]
    pub(crate) invalid_prompt: String,
    #[serde(default = "default_min")]
    pub min_digits: usize,
    pub max_digits: usize,
    /// A regular expression the digits must match in full, e.g. `^[0-9]{5}$`.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Ends the entry early. Default `#`.
    #[serde(default = "default_terminator")]
    pub terminator: char,
    /// Tries before giving up on this field. Default 3.
    #[serde(default = "default_tries")]
    pub(crate) tries: u32,
    /// What happens when the tries run out: skip the field (true) or the exhausted action.
    #[serde(default)]
    pub(crate) optional: bool,
    /// Read the entry back ("You entered 1 0 4 5 8") before the next step. Default true.
    #[serde(default = "default_true")]
    pub(crate) read_back: bool,
}

fn default_true() -> bool {
    true
}

fn default_invalid_collect() -> String {
    "invalid_entry".into()
}
fn default_min() -> usize {
    1
}
fn default_terminator() -> char {
    '#'
}
fn default_tries() -> u32 {
    3
}

impl Collect {
    /// The shipped ZIP-code entry.
    pub(crate) fn zipcode() -> Collect {
        Collect {
            field: "zipcode".into(),
            prompt: "enter_zip".into(),
            invalid_prompt: "invalid_zip".into(),
            min_digits: 5,
            max_digits: 5,
            pattern: Some("^[0-9]{5}$".into()),
            terminator: '#',
            tries: 3,
            optional: false,
            read_back: true,
        }
    }
}

impl Collect {
    /// The house-number entry of a ticket with `house_number: true`: up to 6 digits, pound
    /// alone (or silence) skips it, read back.
    pub(crate) fn house_number() -> Collect {
        Collect {
            field: "house_number".into(),
            prompt: "enter_house_number".into(),
            invalid_prompt: "invalid_entry".into(),
            min_digits: 0,
            max_digits: 6,
            pattern: None,
            terminator: '#',
            tries: 2,
            optional: true,
            read_back: true,
        }
    }
}

/// The recording prompt of a ticket with `house_number: true`: "say the name of the street".
pub(crate) const RECORD_STREET_PROMPT: &str = "record_street";

/// Record the caller (hound WAV), ended by a key, silence or the maximum length.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Record {
    pub prompt: String,
    /// Played before recording starts (a beep).
    pub(crate) beep: Option<String>,
    pub(crate) max_seconds: u32,
    /// This much silence ends the recording.
    pub(crate) silence_seconds: u32,
    /// Ends the recording (or skips it when pressed at once).
    pub end_key: char,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            prompt: "record_description".into(),
            beep: Some("beep".into()),
            max_seconds: 60,
            silence_seconds: 5,
            end_key: '#',
        }
    }
}

/// A YAML syntax or schema error with its position (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parse menu YAML into types. Actions may be one-key maps or plain words.
pub fn parse(text: &str) -> Result<MenuFile, SchemaError> {
    serde_yaml::from_str(text).map_err(|e: serde_yaml::Error| {
        let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        SchemaError {
            line,
            column,
            message: e.to_string(),
        }
    })
}

/// How the caller got somewhere, in words an operator reads: a menu path as the engine records
/// it (`language:1 > screening:1 > main:1 > streets:1`) becomes
/// `Streets and infrastructure > Pothole`, and the service the caller was filing, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PathInWords {
    pub words: String,
    /// The `service` code of the last ticket entry on the path.
    pub service_code: Option<String>,
}

impl MenuFile {
    /// The lines the menu's `transfer` actions name (the server checks them against its
    /// `transfers` config).
    pub fn transfer_targets(&self) -> std::collections::BTreeSet<&str> {
        fn walk<'a>(a: &'a Action, out: &mut std::collections::BTreeSet<&'a str>) {
            match a {
                Action::Transfer(t) => {
                    out.insert(t.to.as_str());
                }
                Action::When(w) => {
                    walk(&w.open, out);
                    walk(&w.closed, out);
                }
                _ => {}
            }
        }
        let mut out = std::collections::BTreeSet::new();
        walk(&self.defaults.on_exhausted, &mut out);
        for m in self.menus.values() {
            for a in m
                .entries
                .values()
                .chain(&m.on_timeout)
                .chain(&m.on_exhausted)
            {
                walk(a, &mut out);
            }
        }
        out
    }

    /// [`PathInWords`] for `path`. The language choice and the 911 screening are left out
    /// (every caller passes them); a menu reads as its `category`, or its id with
    /// underscores as spaces; a ticket as its service's name; steps this file does not know
    /// (a menu since reloaded) as they are.
    pub fn path_in_words(&self, path: &str) -> PathInWords {
        let mut words: Vec<String> = Vec::new();
        let mut service_code = None;
        let say = |w: String, words: &mut Vec<String>| {
            if words.last() != Some(&w) {
                words.push(w);
            }
        };
        let steps: Vec<&str> = path
            .split(" > ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        for (i, step) in steps.iter().copied().enumerate() {
            let Some((id, key)) = step.rsplit_once(':') else {
                say(step.to_owned(), &mut words);
                continue;
            };
            if id == self.start || id == self.screening {
                continue;
            }
            let Some(menu) = self.menus.get(id) else {
                if id == "record" {
                    // The operator key at a request's recording step.
                    say("Operator".into(), &mut words);
                } else if !matches!(id, "after_ticket" | "offer") {
                    say(step.to_owned(), &mut words);
                }
                continue;
            };
            let action = match key {
                "timeout" => menu.on_timeout.as_ref(),
                "exhausted" => menu
                    .on_exhausted
                    .as_ref()
                    .or(Some(&self.defaults.on_exhausted)),
                k => menu.entries.get(k),
            };
            // A `when`: the branch the caller took, as the next step shows (a closed branch
            // that went to a menu), else the open one.
            let mut action = action;
            while let Some(Action::When(w)) = action {
                let next_menu = steps
                    .get(i + 1)
                    .and_then(|n| n.rsplit_once(':'))
                    .map(|n| n.0);
                let took_closed = goto_target_of(&w.closed).is_some_and(|m| Some(m) == next_menu);
                action = Some(if took_closed { &w.closed } else { &w.open });
            }
            match action {
                Some(Action::Goto(next)) => {
                    if let Some(m) = self.menus.get(next) {
                        say(menu_words(next, m), &mut words);
                    }
                }
                Some(Action::Ticket(t)) => {
                    if let Some(cat) = &menu.category {
                        say(cat.clone(), &mut words);
                    }
                    say(t.name.clone(), &mut words);
                    service_code = Some(t.service.clone());
                }
                Some(Action::Queue(_)) => say("Operator".into(), &mut words),
                Some(Action::Status) => say("Request status".into(), &mut words),
                Some(Action::Info(_)) => say(menu_words(id, menu), &mut words),
                Some(Action::Emergency(_)) => say("911".into(), &mut words),
                Some(Action::Transfer(t)) => say(format!("Transfer to {}", t.to), &mut words),
                _ => {}
            }
        }
        PathInWords {
            words: words.join(" > "),
            service_code,
        }
    }
}

fn goto_target_of(a: &Action) -> Option<&str> {
    match a {
        Action::Goto(m) => Some(m),
        Action::Language(l) => Some(&l.goto),
        _ => None,
    }
}

/// A menu as an operator reads it: its category, or its id in words.
fn menu_words(id: &str, m: &Menu) -> String {
    m.category.clone().unwrap_or_else(|| {
        let mut w = id.replace('_', " ");
        if let Some(first) = w.get(..1) {
            let up = first.to_uppercase();
            w.replace_range(..1, &up);
        }
        w
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_read_as_words_or_one_key_maps() {
        let f = parse(
            "languages: [en]\nstart: main\nscreening: main\nmenus:\n  main:\n    greet_long: main_menu\n    entries:\n      '1': {goto: other}\n      '2': emergency\n      '3': {emergency: {reason: gas smell}}\n      '4': {queue: general}\n      '5': {queue: {queue: general, skill: es}}\n      '6': status\n      '7': {info: recycling_info}\n      '8': {ticket: {service: pothole, name: Pothole}}\n      '0': {language: {set: es, goto: main}}\n",
        )
        .unwrap();
        let e = &f.menus["main"].entries;
        assert_eq!(e["1"], Action::Goto("other".into()));
        assert_eq!(e["2"], Action::Emergency(EmergencyEntry::default()));
        assert_eq!(
            e["3"],
            Action::Emergency(EmergencyEntry {
                reason: Some("gas smell".into())
            })
        );
        assert_eq!(
            e["5"],
            Action::Queue(QueueTarget {
                queue: "general".into(),
                skill: Some("es".into())
            })
        );
        assert_eq!(e["6"], Action::Status);
        let Action::Ticket(t) = &e["8"] else { panic!() };
        assert_eq!(t.service, "pothole");
        assert_eq!(f.defaults.emergency_key, '9');
    }

    #[test]
    fn unknown_keys_and_actions_have_positions() {
        let e = parse("languages: [en]\nstart: m\nscreening: m\nmenus:\n  m:\n    greet_long: x\n    entrys: {}\n")
            .unwrap_err();
        assert_eq!(e.line, 7);
        assert!(e.message.contains("entrys"), "{}", e.message);
        let e = parse("languages: [en]\nstart: m\nscreening: m\nmenus:\n  m:\n    greet_long: x\n    entries:\n      '1': {gotoo: y}\n")
            .unwrap_err();
        assert_eq!(e.line, 8);
        assert!(e.message.contains("gotoo"));
    }

    #[test]
    fn a_menu_path_reads_in_words_with_the_service_it_was_filing() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("menus/311.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let file: MenuFile = serde_yaml::from_str(&text).unwrap();
        let p = file.path_in_words("language:1 > screening:1 > main:1 > streets:1");
        assert_eq!(p.words, "Streets and infrastructure > Pothole");
        assert_eq!(p.service_code.as_deref(), Some("pothole"));
        let p = file.path_in_words("language:1 > screening:1 > main:1 > streets:1 > record:0");
        assert_eq!(p.words, "Streets and infrastructure > Pothole > Operator");
        assert_eq!(p.service_code.as_deref(), Some("pothole"));
        let p = file.path_in_words("language:2 > screening:1 > main:0");
        assert_eq!(p.words, "Operator");
        assert_eq!(p.service_code, None);
        let p = file.path_in_words("language:1 > screening:1 > main:4 > gone:3");
        assert!(p.words.ends_with("gone:3"), "{}", p.words);
        assert_eq!(file.path_in_words("").words, "");
    }
}
