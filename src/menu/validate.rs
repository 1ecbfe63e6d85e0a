//! `ivr311 check`: everything wrong with a menu file, each problem with its line and column.
//!
//! Owns the semantic rules of the menu language ([`crate::menu::schema`] owns the syntax):
//! dangling and unreachable menus, loops with no way out, prompts missing in a language, phone
//! keys, digit entry limits and patterns, Open311 service codes, and the safety rules of
//! DESIGN.md ("nobody is kept from 911"). A menu is only ever used after [`load`] or
//! [`check_text`] accepted it; live reload keeps the old menu when they refuse the new one.
//!
//! Positions come from a second, event-level read of the YAML (`saphyr-parser`): serde gives
//! the typed [`MenuFile`], the event tree says where each key and value sits and finds the
//! duplicate keys that serde would silently merge. All problems are reported at once, sorted by
//! position. Nothing here panics on admin input.
//!
//! Imports only [`crate::menu::schema`]; the engine and the call layer import this.

use super::schedule::{self, Schedules};
use super::schema::{self, Action, Collect, MenuFile, Record, TicketAction, TicketSteps};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};

/// Prompts the engine plays by itself, whatever the menus say, besides the number words and
/// digits of [`super::say::PROMPTS`]; [`engine_prompts`] gives both.
pub(crate) const ENGINE_PROMPTS: &[&str] = &[
    "you_entered",
    "ticket_filed",
    "ticket_again",
    "after_ticket",
    "enter_ticket_number",
    "ticket_not_found",
    "ticket_status_open",
    "ticket_status_closed",
    "ticket_last_update",
    "updated_today",
    "updated_yesterday",
    "updated_days_ago_post",
    "connecting_911",
    "emergency_announce",
    // A menu's `transfer` to a crisis or utility line (src/call/core.rs).
    "connecting_transfer",
    "transfer_unreachable",
    "operator_unavailable",
    "offer_general_ticket",
    "db_error",
    "call_again_later",
    "goodbye",
    // Operator queue and call-back (src/call/core.rs, src/call/callback.rs).
    "operator_queue",
    "queue_position",
    "queue_wait",
    "queue_wait_one",
    "queue_options",
    "minutes",
    "hold_music",
    "callback_confirmed",
    "callback_kept",
    "callback_hello",
    "callback_unavailable",
    // Said to callers still in a menu when the server stops (src/call/core.rs).
    "shutdown_goodbye",
    // Emergency announcements after screening, and their fallback (src/call/core.rs).
    "announcement_intro",
    "announcement_fallback",
    // A repeat caller's open request (`repeat_callers`).
    "open_request",
    "filed_today",
    "filed_yesterday",
    "filed_days_ago_pre",
    "filed_days_ago_post",
    "open_request_status",
    // Duplicate reports (`duplicates`).
    "already_reported",
    "duplicate_choice",
    "added_to_request",
];

/// Every prompt the engine may play whatever the menus say: they must exist in every language
/// of the file.
pub fn engine_prompts() -> impl Iterator<Item = &'static str> + Clone {
    ENGINE_PROMPTS.iter().chain(super::say::PROMPTS).copied()
}

/// The keys of a phone keypad (RFC 4733 events 0-15).
pub(crate) const DTMF_KEYS: &[char] = &[
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '*', '#', 'A', 'B', 'C', 'D',
];

/// Ticket fields a digit entry can fill (`address` is the Open311 `address_id`).
pub(crate) const COLLECT_FIELDS: &[&str] = &["zipcode", "address", "house_number"];

const KEYS_TEXT: &str = "0-9, *, #, A-D";
const MAX_TIMEOUT_SECONDS: f64 = 120.0;
const MAX_DIGITS: usize = 32;
const MAX_TRIES: u32 = 10;
const MAX_RECORD_SECONDS: u32 = 300;

/// One problem, with where it is (1-based line and column in the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// A validated, loaded menu: the parsed file plus what the engine derives from it.
#[derive(Debug, Clone)]
pub struct LoadedMenu {
    pub file: MenuFile,
    /// Where it was read from (for reload and for messages).
    pub(crate) path: PathBuf,
    /// The main menu: where the screening menu leads on its timeout (or its first `goto`
    /// entry); [`Action::Top`] goes there.
    pub main: String,
    /// The file's `schedules`, compiled.
    pub schedules: std::sync::Arc<Schedules>,
}

/// Why a menu file was refused.
#[derive(Debug, thiserror::Error)]
pub enum MenuError {
    /// A file or folder could not be read.
    #[error("{}: cannot read: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but breaks the rules; every problem, one `path:line:col: message`
    /// line each.
    #[error("{}", render_problems(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}:{p}", path.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which prompts exist, per language, so validation does not need to decode WAVs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptIndex {
    by_lang: BTreeMap<String, BTreeSet<String>>,
}

impl PromptIndex {
    /// Index `<dir>/<lang>/<name>.wav`. Other files and non-UTF-8 names are ignored.
    pub fn from_dir(dir: &Path) -> std::io::Result<Self> {
        let mut index = PromptIndex::default();
        for lang_entry in std::fs::read_dir(dir)? {
            let lang_entry = lang_entry?;
            let lang_path = lang_entry.path();
            if !lang_path.is_dir() {
                continue;
            }
            let Some(lang) = lang_entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let names = index.by_lang.entry(lang).or_default();
            for file in std::fs::read_dir(&lang_path)? {
                let file = file?;
                let file_name = file.file_name();
                let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".wav")) else {
                    continue;
                };
                if !name.is_empty() && file.path().is_file() {
                    names.insert(name.to_owned());
                }
            }
        }
        Ok(index)
    }

    /// An index of `(language, prompt name)` pairs (tests, or prompts kept elsewhere).
    pub fn from_names(langs_and_names: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut index = PromptIndex::default();
        for (lang, name) in langs_and_names {
            index.by_lang.entry(lang).or_default().insert(name);
        }
        index
    }

    /// Whether `<lang>/<name>` exists.
    pub fn has(&self, lang: &str, name: &str) -> bool {
        self.by_lang.get(lang).is_some_and(|n| n.contains(name))
    }

    /// Whether the language has any prompt at all.
    pub(crate) fn has_language(&self, lang: &str) -> bool {
        self.by_lang.get(lang).is_some_and(|n| !n.is_empty())
    }
}

/// Read and check a menu file.
pub fn load(path: &Path, prompts: &PromptIndex) -> Result<LoadedMenu, MenuError> {
    let text = std::fs::read_to_string(path).map_err(|source| MenuError::Io {
        path: path.to_owned(),
        source,
    })?;
    check_text(path, &text, prompts).map_err(|problems| MenuError::Invalid {
        path: path.to_owned(),
        problems,
    })
}

/// Check menu YAML already in memory. `path` is only recorded in the result.
pub fn check_text(
    path: &Path,
    text: &str,
    prompts: &PromptIndex,
) -> Result<LoadedMenu, Vec<Problem>> {
    let tree = Tree::parse(text);
    let mut problems = tree.duplicates.clone();
    match schema::parse(text) {
        Err(e) => {
            let duplicate_field = e
                .message
                .split("duplicate field `")
                .nth(1)
                .and_then(|rest| rest.split('`').next());
            // serde stops at a duplicate struct field; the scan already said where both are.
            let covered =
                duplicate_field.is_some_and(|name| tree.duplicate_names.iter().any(|d| d == name));
            if !covered {
                problems.push(schema_problem(&e));
            }
            Err(finish(problems))
        }
        Ok(file) => {
            if let Some(p) = &tree.error {
                problems.push(p.clone());
            }
            let mut checker = Checker {
                f: &file,
                t: &tree,
                prompts,
                today: jiff::Timestamp::now()
                    .to_zoned_datetime(jiff::tz::TimeZone::UTC)
                    .date(),
                schedules: Schedules::new(),
                out: Vec::new(),
            };
            let main = checker.run();
            problems.append(&mut checker.out);
            let schedules = std::sync::Arc::new(std::mem::take(&mut checker.schedules));
            match main {
                Some(main) if problems.is_empty() => Ok(LoadedMenu {
                    file,
                    path: path.to_owned(),
                    main,
                    schedules,
                }),
                _ => Err(finish(problems)),
            }
        }
    }
}

fn schema_problem(e: &schema::SchemaError) -> Problem {
    // serde_yaml repeats the position inside its message; it is already in front.
    let here = format!(" at line {} column {}", e.line, e.column);
    Problem {
        line: e.line,
        column: e.column,
        message: e.message.replacen(&here, "", 1).replace('\n', " "),
    }
}

fn finish(mut problems: Vec<Problem>) -> Vec<Problem> {
    problems.sort_by(|a, b| (a.line, a.column, &a.message).cmp(&(b.line, b.column, &b.message)));
    problems.dedup();
    problems
}

// ---------------------------------------------------------------------------------------------
// The positioned YAML tree.

#[derive(Debug, Clone)]
enum Kind {
    Scalar(String),
    Seq(Vec<usize>),
    Map(Vec<(usize, usize)>),
    /// An alias, resolved to the anchored node.
    Alias(usize),
    /// An alias to an unknown anchor, or a collection left open by a syntax error.
    Other,
}

#[derive(Debug, Clone)]
struct Node {
    line: usize,
    column: usize,
    kind: Kind,
}

enum Frame {
    Seq {
        node: usize,
        items: Vec<usize>,
    },
    Map {
        node: usize,
        pairs: Vec<(usize, usize)>,
        key: Option<usize>,
        seen: HashMap<String, usize>,
    },
}

/// The first YAML document as a tree of nodes with positions.
#[derive(Debug, Default)]
struct Tree {
    nodes: Vec<Node>,
    root: Option<usize>,
    /// `duplicate key ...` problems.
    duplicates: Vec<Problem>,
    duplicate_names: Vec<String>,
    /// A syntax error the event parser hit.
    error: Option<Problem>,
}

/// Where a path led: the key node and value node of its last segment that exists.
struct Found {
    complete: bool,
    key: Option<usize>,
    value: Option<usize>,
}

impl Tree {
    fn parse(text: &str) -> Tree {
        let mut t = Tree::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut anchors: HashMap<usize, usize> = HashMap::new();
        for event in saphyr_parser::Parser::new_from_str(text) {
            let (event, span) = match event {
                Ok(e) => e,
                Err(e) => {
                    t.error = Some(Problem {
                        line: e.marker().line(),
                        column: e.marker().col() + 1,
                        message: format!("YAML syntax: {}", e.info()),
                    });
                    break;
                }
            };
            let (line, column) = (span.start.line(), span.start.col() + 1);
            use saphyr_parser::Event;
            match event {
                Event::DocumentEnd if t.root.is_some() => break,
                Event::Scalar(value, _, anchor, _) => {
                    let id = t.push(line, column, Kind::Scalar(value.into_owned()));
                    if anchor != 0 {
                        anchors.insert(anchor, id);
                    }
                    t.attach(&mut stack, id);
                }
                Event::Alias(anchor) => {
                    let kind = anchors
                        .get(&anchor)
                        .map_or(Kind::Other, |&a| Kind::Alias(a));
                    let id = t.push(line, column, kind);
                    t.attach(&mut stack, id);
                }
                Event::SequenceStart(anchor, _) => {
                    let node = t.push(line, column, Kind::Other);
                    if anchor != 0 {
                        anchors.insert(anchor, node);
                    }
                    stack.push(Frame::Seq {
                        node,
                        items: Vec::new(),
                    });
                }
                Event::MappingStart(anchor, _) => {
                    let node = t.push(line, column, Kind::Other);
                    if anchor != 0 {
                        anchors.insert(anchor, node);
                    }
                    stack.push(Frame::Map {
                        node,
                        pairs: Vec::new(),
                        key: None,
                        seen: HashMap::new(),
                    });
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    let (node, kind) = match stack.pop() {
                        Some(Frame::Seq { node, items }) => (node, Kind::Seq(items)),
                        Some(Frame::Map { node, pairs, .. }) => (node, Kind::Map(pairs)),
                        None => continue,
                    };
                    if let Some(n) = t.nodes.get_mut(node) {
                        n.kind = kind;
                    }
                    t.attach(&mut stack, node);
                }
                _ => {}
            }
        }
        t
    }

    fn push(&mut self, line: usize, column: usize, kind: Kind) -> usize {
        self.nodes.push(Node { line, column, kind });
        self.nodes.len() - 1
    }

    /// Hang a finished node on the open collection (or make it the root), checking keys.
    fn attach(&mut self, stack: &mut [Frame], id: usize) {
        let Some(frame) = stack.last_mut() else {
            self.root.get_or_insert(id);
            return;
        };
        match frame {
            Frame::Seq { items, .. } => items.push(id),
            Frame::Map {
                pairs, key, seen, ..
            } => match key.take() {
                Some(k) => pairs.push((k, id)),
                None => {
                    *key = Some(id);
                    if let Some(text) = self.scalar(id) {
                        let text = text.to_owned();
                        let line = self.nodes.get(id).map_or(1, |n| n.line);
                        if let Some(first) = seen.get(&text) {
                            let (l, c) = self.pos(id);
                            self.duplicates.push(Problem {
                                line: l,
                                column: c,
                                message: format!(
                                    "duplicate key \"{text}\" (first at line {first})"
                                ),
                            });
                            self.duplicate_names.push(text);
                        } else {
                            seen.insert(text, line);
                        }
                    }
                }
            },
        }
    }

    fn resolve(&self, mut id: usize) -> usize {
        // Aliases point back to earlier nodes, so this ends; the bound is belt and braces.
        for _ in 0..64 {
            match self.nodes.get(id).map(|n| &n.kind) {
                Some(Kind::Alias(target)) => id = *target,
                _ => break,
            }
        }
        id
    }

    fn scalar(&self, id: usize) -> Option<&str> {
        match &self.nodes.get(self.resolve(id))?.kind {
            Kind::Scalar(s) => Some(s),
            _ => None,
        }
    }

    fn pos(&self, id: usize) -> (usize, usize) {
        self.nodes.get(id).map_or((1, 1), |n| (n.line, n.column))
    }

    /// Children of a mapping or sequence, in file order, as (key, value).
    fn children(&self, id: usize) -> Vec<(Option<usize>, usize)> {
        match self.nodes.get(self.resolve(id)).map(|n| &n.kind) {
            Some(Kind::Map(pairs)) => pairs.iter().map(|&(k, v)| (Some(k), v)).collect(),
            Some(Kind::Seq(items)) => items.iter().map(|&v| (None, v)).collect(),
            _ => Vec::new(),
        }
    }

    fn child(&self, id: usize, seg: &str) -> Option<(Option<usize>, usize)> {
        match self.nodes.get(self.resolve(id)).map(|n| &n.kind) {
            // serde keeps the last of duplicate map keys.
            Some(Kind::Map(pairs)) => pairs
                .iter()
                .rev()
                .find(|(k, _)| self.scalar(*k) == Some(seg))
                .map(|&(k, v)| (Some(k), v)),
            Some(Kind::Seq(items)) => seg
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get(i))
                .map(|&v| (None, v)),
            _ => None,
        }
    }

    fn find(&self, path: &[&str]) -> Found {
        let mut found = Found {
            complete: true,
            key: None,
            value: self.root,
        };
        for seg in path {
            let next = found.value.and_then(|v| self.child(v, seg));
            match next {
                Some((k, v)) => {
                    found.key = k;
                    found.value = Some(v);
                }
                None => {
                    found.complete = false;
                    break;
                }
            }
        }
        found
    }

    fn exists(&self, path: &[&str]) -> bool {
        self.find(path).complete
    }

    /// Position of the value at `path`, or of the deepest part of it that exists.
    fn value_pos(&self, path: &[&str]) -> (usize, usize) {
        self.find(path).value.map_or((1, 1), |v| self.pos(v))
    }

    /// Position of the key of the last segment of `path` (or of the deepest that exists).
    fn key_pos(&self, path: &[&str]) -> (usize, usize) {
        let f = self.find(path);
        match (f.key, f.value) {
            (Some(k), _) => self.pos(k),
            (None, Some(v)) => self.pos(v),
            (None, None) => (1, 1),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// Where an action sits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot<'a> {
    Entry(&'a str),
    OnTimeout,
    OnExhausted,
    DefaultOnExhausted,
}

struct Site<'a> {
    /// The menu it belongs to; `None` for `defaults.on_exhausted`.
    menu: Option<&'a str>,
    slot: Slot<'a>,
    path: Vec<&'a str>,
    action: &'a Action,
}

fn join<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(more).copied().collect()
}

fn is_key(c: char) -> bool {
    DTMF_KEYS.contains(&c)
}

fn is_exit(a: &Action) -> bool {
    matches!(
        a,
        Action::Ticket(_)
            | Action::Status
            | Action::Queue(_)
            | Action::Emergency(_)
            | Action::Transfer(_)
            | Action::Hangup
    )
}

/// The menu an action moves the caller to, if any (not `back` or `top`).
fn goto_target(a: &Action) -> Option<&str> {
    match a {
        Action::Goto(m) => Some(m),
        Action::Language(l) => Some(&l.goto),
        _ => None,
    }
}

fn goto_path<'a>(base: &[&'a str], a: &Action) -> Vec<&'a str> {
    match a {
        Action::Goto(_) => join(base, &["goto"]),
        Action::Language(_) => join(base, &["language", "goto"]),
        _ => base.to_vec(),
    }
}

struct Checker<'a> {
    f: &'a MenuFile,
    t: &'a Tree,
    prompts: &'a PromptIndex,
    /// Starts the window searched for days when a schedule's hours fall in a DST gap.
    today: jiff::civil::Date,
    /// The schedules that compiled.
    schedules: Schedules,
    out: Vec<Problem>,
}

impl<'a> Checker<'a> {
    fn at(&mut self, (line, column): (usize, usize), message: String) {
        self.out.push(Problem {
            line,
            column,
            message,
        });
    }

    fn at_value(&mut self, path: &[&str], message: String) {
        let pos = self.t.value_pos(path);
        self.at(pos, message);
    }

    fn at_key(&mut self, path: &[&str], message: String) {
        let pos = self.t.key_pos(path);
        self.at(pos, message);
    }

    /// Runs every check; returns the main menu id when there is one.
    fn run(&mut self) -> Option<String> {
        let sites = self.sites();
        self.schedules();
        self.languages();
        self.top_level_refs();
        self.defaults();
        self.menus();
        self.actions(&sites);
        self.services(&sites);
        self.duplicates(&sites);
        self.engine_prompts();
        self.safety(&sites);
        let main = self.main_menu();
        self.reachability(&sites, main.as_deref());
        main
    }

    /// Duplicate checks look back 1 to 365 days.
    fn duplicates(&mut self, sites: &[Site<'a>]) {
        const RANGE: std::ops::RangeInclusive<u32> = 1..=365;
        if let Some(d) = self.f.duplicates {
            if !RANGE.contains(&d.days) {
                self.at_value(
                    &["duplicates", "days"],
                    format!("duplicates.days must be 1 to 365, not {}", d.days),
                );
            }
        }
        for site in sites {
            if let Action::Ticket(t) = site.action {
                if let Some(d) = t.duplicates.filter(|d| !RANGE.contains(&d.days)) {
                    let path = join(&site.path, &["ticket", "duplicates", "days"]);
                    self.at_value(
                        &path,
                        format!("duplicates.days must be 1 to 365, not {}", d.days),
                    );
                }
            }
        }
    }

    /// Every action of the file, and each branch of a `when` as an action of the same place
    /// (what the caller gets, open or closed, obeys the rules of where it is written).
    fn sites(&self) -> Vec<Site<'a>> {
        fn push<'a>(sites: &mut Vec<Site<'a>>, site: Site<'a>) {
            if let Action::When(w) = site.action {
                for (branch, action) in [("open", &w.open), ("closed", &w.closed)] {
                    push(
                        sites,
                        Site {
                            menu: site.menu,
                            slot: site.slot,
                            path: join(&site.path, &["when", branch]),
                            action,
                        },
                    );
                }
            }
            sites.push(site);
        }
        let f: &'a MenuFile = self.f;
        let mut sites = Vec::new();
        for (id, m) in &f.menus {
            for (key, action) in &m.entries {
                push(
                    &mut sites,
                    Site {
                        menu: Some(id),
                        slot: Slot::Entry(key),
                        path: vec!["menus", id, "entries", key],
                        action,
                    },
                );
            }
            if let Some(action) = &m.on_timeout {
                push(
                    &mut sites,
                    Site {
                        menu: Some(id),
                        slot: Slot::OnTimeout,
                        path: vec!["menus", id, "on_timeout"],
                        action,
                    },
                );
            }
            if let Some(action) = &m.on_exhausted {
                push(
                    &mut sites,
                    Site {
                        menu: Some(id),
                        slot: Slot::OnExhausted,
                        path: vec!["menus", id, "on_exhausted"],
                        action,
                    },
                );
            }
        }
        push(
            &mut sites,
            Site {
                menu: None,
                slot: Slot::DefaultOnExhausted,
                path: vec!["defaults", "on_exhausted"],
                action: &f.defaults.on_exhausted,
            },
        );
        sites
    }

    /// Each schedule compiles: a known time zone, well-formed days, hours and dates, no
    /// overlaps, no boundary in a DST gap.
    fn schedules(&mut self) {
        let f: &'a MenuFile = self.f;
        for (name, spec) in &f.schedules {
            match schedule::compile(spec, self.today) {
                Ok(s) => {
                    self.schedules.insert(name.clone(), s);
                }
                Err(problems) => {
                    for p in problems {
                        let rel = p.at.path();
                        let mut path = vec!["schedules", name.as_str()];
                        path.extend(rel.iter().map(String::as_str));
                        let message = format!("schedule \"{name}\": {}", p.message);
                        if p.at.is_key() {
                            self.at_key(&path, message);
                        } else {
                            self.at_value(&path, message);
                        }
                    }
                }
            }
        }
    }

    /// The actions a menu can run: its entries, its timeout action and the `on_exhausted` it
    /// has or inherits.
    fn menu_actions<'s>(&self, sites: &'s [Site<'a>], id: &str) -> Vec<&'s Site<'a>> {
        let mut v: Vec<&Site> = sites.iter().filter(|s| s.menu == Some(id)).collect();
        if !v.iter().any(|s| s.slot == Slot::OnExhausted) {
            v.extend(sites.iter().filter(|s| s.slot == Slot::DefaultOnExhausted));
        }
        v
    }

    fn languages(&mut self) {
        let f = self.f;
        if f.languages.is_empty() {
            self.at_key(
                &["languages"],
                "languages must list at least one language".into(),
            );
        }
        let mut seen = HashSet::new();
        for (i, lang) in f.languages.iter().enumerate() {
            let idx = i.to_string();
            if !seen.insert(lang.as_str()) {
                self.at_value(
                    &["languages", &idx],
                    format!("language \"{lang}\" is listed twice"),
                );
            } else if !self.prompts.has_language(lang) {
                self.at_value(
                    &["languages", &idx],
                    format!("there are no prompts at all for language \"{lang}\""),
                );
            }
        }
    }

    fn top_level_refs(&mut self) {
        let f = self.f;
        if !f.menus.contains_key(&f.start) {
            self.at_value(
                &["start"],
                format!("start menu \"{}\" does not exist", f.start),
            );
        }
        if !f.menus.contains_key(&f.screening) {
            self.at_value(
                &["screening"],
                format!("screening menu \"{}\" does not exist", f.screening),
            );
        }
    }

    /// Languages that have prompts but not this one (languages with none are reported once).
    fn missing_langs(&self, name: &str) -> Vec<&'a str> {
        let f: &'a MenuFile = self.f;
        let mut seen = HashSet::new();
        f.languages
            .iter()
            .filter(|l| seen.insert(l.as_str()))
            .filter(|l| self.prompts.has_language(l) && !self.prompts.has(l, name))
            .map(String::as_str)
            .collect()
    }

    fn missing_text(name: &str, langs: &[&str]) -> String {
        let which = if langs.len() == 1 {
            format!("language {}", langs.join(""))
        } else {
            format!("languages {}", langs.join(", "))
        };
        format!("prompt \"{name}\" is missing for {which}")
    }

    /// A prompt named at `path`, or used there by default when `path` is not in the file: then
    /// the problem is shown at the item that leaves it out, or at `languages` when that item
    /// is not written either (built-in defaults).
    fn prompt(&mut self, path: &[&str], name: &str) {
        let missing = self.missing_langs(name);
        if missing.is_empty() {
            return;
        }
        let mut message = Self::missing_text(name, &missing);
        let parent = &path[..path.len().saturating_sub(1)];
        let pos = if self.t.exists(path) {
            self.t.value_pos(path)
        } else {
            if self.t.exists(parent) {
                let last = path.last().copied().unwrap_or("prompt");
                message.push_str(&format!(" (the default {last})"));
                self.t.key_pos(parent)
            } else {
                message.push_str(&format!(" (the default {})", path.join(".")));
                self.t.key_pos(&["languages"])
            }
        };
        self.at(pos, message);
    }

    fn seconds(&mut self, path: &[&str], v: f64) {
        if !(v.is_finite() && v > 0.0 && v < MAX_TIMEOUT_SECONDS) {
            let name = path.last().copied().unwrap_or("timeout");
            self.at_value(
                path,
                format!("{name} must be more than 0 and less than 120 seconds (got {v})"),
            );
        }
    }

    fn count(&mut self, path: &[&str], v: u32) {
        if !(1..=MAX_TRIES).contains(&v) {
            let name = path.last().copied().unwrap_or("count");
            self.at_value(
                path,
                format!("{name} must be between 1 and {MAX_TRIES} (got {v})"),
            );
        }
    }

    fn defaults(&mut self) {
        let d = &self.f.defaults;
        self.seconds(&["defaults", "timeout_seconds"], d.timeout_seconds);
        self.seconds(
            &["defaults", "inter_digit_timeout_seconds"],
            d.inter_digit_timeout_seconds,
        );
        self.count(&["defaults", "max_failures"], d.max_failures);
        self.count(&["defaults", "max_timeouts"], d.max_timeouts);
        self.prompt(&["defaults", "invalid_prompt"], &d.invalid_prompt);
        self.prompt(&["defaults", "timeout_prompt"], &d.timeout_prompt);
        let keys = [
            ("repeat_key", d.repeat_key),
            ("back_key", d.back_key),
            ("emergency_key", d.emergency_key),
        ];
        for (i, (name, c)) in keys.iter().enumerate() {
            if !is_key(*c) {
                self.at_value(
                    &["defaults", name],
                    format!("{name} \"{c}\" is not a phone key ({KEYS_TEXT})"),
                );
            }
            for (other, oc) in &keys[..i] {
                if oc == c {
                    // Point at the one the admin wrote (the other may be a default).
                    let at = if self.t.exists(&["defaults", name]) {
                        name
                    } else {
                        other
                    };
                    self.at_value(
                        &["defaults", at],
                        format!("{name} and {other} are both \"{c}\"; they must differ"),
                    );
                }
            }
        }
        self.steps(&["defaults", "ticket"], &d.ticket);
    }

    fn menus(&mut self) {
        let f = self.f;
        let d = &f.defaults;
        for (id, m) in &f.menus {
            let base = ["menus", id.as_str()];
            if m.entries.is_empty() {
                self.at_key(
                    &join(&base, &["entries"]),
                    format!("menu \"{id}\" has no entries"),
                );
            }
            for key in m.entries.keys() {
                let path = join(&base, &["entries", key]);
                let mut chars = key.chars();
                let single = match (chars.next(), chars.next()) {
                    (Some(c), None) if is_key(c) => Some(c),
                    _ => None,
                };
                match single {
                    None => self.at_key(
                        &path,
                        format!("key \"{key}\" is not a single phone key ({KEYS_TEXT})"),
                    ),
                    Some(c) if c == d.repeat_key => self.at_key(
                        &path,
                        format!("key \"{c}\" is the repeat key (defaults.repeat_key) and cannot also be a menu entry"),
                    ),
                    Some(c) if c == d.back_key => self.at_key(
                        &path,
                        format!("key \"{c}\" is the back key (defaults.back_key) and cannot also be a menu entry"),
                    ),
                    Some(_) => {}
                }
            }
            if let Some(v) = m.timeout_seconds {
                self.seconds(&join(&base, &["timeout_seconds"]), v);
            }
            if let Some(v) = m.max_failures {
                self.count(&join(&base, &["max_failures"]), v);
            }
            if let Some(v) = m.max_timeouts {
                self.count(&join(&base, &["max_timeouts"]), v);
            }
            self.prompt(&join(&base, &["greet_long"]), &m.greet_long);
            for (name, value) in [
                ("greet_short", &m.greet_short),
                ("invalid_prompt", &m.invalid_prompt),
                ("timeout_prompt", &m.timeout_prompt),
            ] {
                if let Some(p) = value {
                    self.prompt(&join(&base, &[name]), p);
                }
            }
        }
    }

    fn actions(&mut self, sites: &[Site<'a>]) {
        let f = self.f;
        for s in sites {
            if let Some(target) = goto_target(s.action) {
                if !f.menus.contains_key(target) {
                    self.at_value(
                        &goto_path(&s.path, s.action),
                        format!("no menu named \"{target}\""),
                    );
                }
            }
            match s.action {
                Action::Language(l) if !f.languages.contains(&l.set) => self.at_value(
                    &join(&s.path, &["language", "set"]),
                    format!(
                        "language \"{}\" is not in languages [{}]",
                        l.set,
                        f.languages.join(", ")
                    ),
                ),
                Action::Info(name) => self.prompt(&join(&s.path, &["info"]), name),
                Action::When(w) if !f.schedules.contains_key(&w.schedule) => {
                    let known: Vec<&str> = f.schedules.keys().map(String::as_str).collect();
                    self.at_value(
                        &join(&s.path, &["when", "schedule"]),
                        format!(
                            "no schedule named \"{}\" (schedules: {})",
                            w.schedule,
                            if known.is_empty() { "none".into() } else { known.join(", ") }
                        ),
                    )
                }
                Action::Queue(_) => self.queue_fields(&join(&s.path, &["queue"])),
                Action::Ticket(t) => {
                    let tp = join(&s.path, &["ticket"]);
                    if let Some(steps) = &t.steps {
                        self.steps(&join(&tp, &["steps"]), steps);
                    }
                    if t.house_number {
                        let at = join(&tp, &["house_number"]);
                        self.prompt(&at, &Collect::house_number().prompt);
                        self.prompt(&at, super::schema::RECORD_STREET_PROMPT);
                    }
                }
                Action::Transfer(t) => {
                    if let Some(a) = &t.announce {
                        self.prompt(&join(&s.path, &["transfer", "announce"]), a);
                    }
                    match s.slot {
                        Slot::OnExhausted | Slot::DefaultOnExhausted => self.at_value(
                            &s.path,
                            "on_exhausted must not transfer: callers who are confused or silent would be sent to a crisis line".into(),
                        ),
                        Slot::OnTimeout => self.at_value(
                            &s.path,
                            "on_timeout must not transfer: silence must not send a caller to a crisis line".into(),
                        ),
                        Slot::Entry(_) => {}
                    }
                }
                Action::Emergency(_) => match s.slot {
                    Slot::OnExhausted | Slot::DefaultOnExhausted => self.at_value(
                        &s.path,
                        "on_exhausted must not be emergency: callers who are confused or silent would be sent to 911".into(),
                    ),
                    Slot::OnTimeout => self.at_value(
                        &s.path,
                        "on_timeout must not be emergency: silence must not dial 911".into(),
                    ),
                    Slot::Entry(_) => {}
                },
                _ => {}
            }
        }
    }

    /// `{queue: {queue: general, skil: es}}`: the schema lets a misspelt `skill` through.
    fn queue_fields(&mut self, path: &[&str]) {
        let f = self.t.find(path);
        let Some(node) = f.value.filter(|_| f.complete) else {
            return;
        };
        for (key, _) in self.t.children(node) {
            let Some(key) = key else { continue };
            match self.t.scalar(key) {
                Some("queue" | "skill") => {}
                other => {
                    let name = other.unwrap_or("?");
                    let pos = self.t.pos(key);
                    self.at(
                        pos,
                        format!("unknown field \"{name}\" in queue (expected queue or skill)"),
                    );
                }
            }
        }
    }

    fn steps(&mut self, base: &[&str], steps: &TicketSteps) {
        let mut fields = HashSet::new();
        for (i, c) in steps.collect.iter().enumerate() {
            let idx = i.to_string();
            let p = join(base, &["collect", &idx]);
            if !COLLECT_FIELDS.contains(&c.field.as_str()) {
                self.at_value(
                    &join(&p, &["field"]),
                    format!(
                        "field \"{}\" is not a ticket field (one of: {})",
                        c.field,
                        COLLECT_FIELDS.join(", ")
                    ),
                );
            } else if !fields.insert(c.field.as_str()) {
                self.at_value(
                    &join(&p, &["field"]),
                    format!("field \"{}\" is collected twice", c.field),
                );
            }
            self.collect(&p, c);
        }
        if let Some(r) = &steps.record {
            self.record(&join(base, &["record"]), r);
        }
    }

    fn collect(&mut self, p: &[&str], c: &Collect) {
        self.prompt(&join(p, &["prompt"]), &c.prompt);
        self.prompt(&join(p, &["invalid_prompt"]), &c.invalid_prompt);
        let digits_ok = (1..=MAX_DIGITS).contains(&c.max_digits);
        if !digits_ok {
            self.at_value(
                &join(p, &["max_digits"]),
                format!(
                    "max_digits must be between 1 and {MAX_DIGITS} (got {})",
                    c.max_digits
                ),
            );
        }
        let order_ok = c.min_digits <= c.max_digits;
        if !order_ok {
            self.at_value(
                &join(p, &["min_digits"]),
                format!(
                    "min_digits ({}) is more than max_digits ({})",
                    c.min_digits, c.max_digits
                ),
            );
        }
        if !is_key(c.terminator) {
            self.at_value(
                &join(p, &["terminator"]),
                format!(
                    "terminator \"{}\" is not a phone key ({KEYS_TEXT})",
                    c.terminator
                ),
            );
        }
        if !(1..=MAX_TRIES).contains(&c.tries) {
            self.at_value(
                &join(p, &["tries"]),
                format!("tries must be between 1 and {MAX_TRIES} (got {})", c.tries),
            );
        }
        if let Some(pattern) = &c.pattern {
            let keys: Vec<char> = ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '*', '#']
                .into_iter()
                .filter(|&k| k != c.terminator)
                .collect();
            let lengths = (digits_ok && order_ok).then_some((c.min_digits, c.max_digits));
            if let Err(message) = check_pattern(pattern, lengths, &keys) {
                self.at_value(&join(p, &["pattern"]), message);
            }
        }
    }

    fn record(&mut self, p: &[&str], r: &Record) {
        self.prompt(&join(p, &["prompt"]), &r.prompt);
        if let Some(beep) = &r.beep {
            self.prompt(&join(p, &["beep"]), beep);
        }
        if !(1..=MAX_RECORD_SECONDS).contains(&r.max_seconds) {
            self.at_value(
                &join(p, &["max_seconds"]),
                format!(
                    "max_seconds must be between 1 and {MAX_RECORD_SECONDS} (got {})",
                    r.max_seconds
                ),
            );
        }
        if !is_key(r.end_key) {
            self.at_value(
                &join(p, &["end_key"]),
                format!("end_key \"{}\" is not a phone key ({KEYS_TEXT})", r.end_key),
            );
        }
    }

    /// Open311 lists one service per code: codes are well-formed and not defined twice.
    fn services(&mut self, sites: &[Site<'a>]) {
        let mut tickets: Vec<((usize, usize), Vec<&str>, &TicketAction)> = sites
            .iter()
            .filter_map(|s| match s.action {
                Action::Ticket(t) => {
                    let p = join(&s.path, &["ticket", "service"]);
                    Some((self.t.value_pos(&p), p, &**t))
                }
                _ => None,
            })
            .collect();
        tickets.sort_by_key(|(pos, _, _)| *pos);
        let mut first: HashMap<&str, ((usize, usize), &TicketAction)> = HashMap::new();
        for (pos, path, t) in tickets {
            let code = t.service.as_str();
            let well_formed = !code.is_empty()
                && code
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !well_formed {
                self.at_value(
                    &path,
                    format!("service code \"{code}\" must use only a-z, 0-9 and _"),
                );
            }
            match first.get(code) {
                Some(((line, _), other)) if *other != t => self.at(
                    pos,
                    format!("service \"{code}\" is already defined differently at line {line} (Open311 lists one service per code)"),
                ),
                Some(_) => {}
                None => {
                    first.insert(code, (pos, t));
                }
            }
        }
    }

    fn engine_prompts(&mut self) {
        let pos = self.t.key_pos(&["languages"]);
        for name in engine_prompts() {
            let missing = self.missing_langs(name);
            if !missing.is_empty() {
                let message = format!("built-in {}", Self::missing_text(name, &missing));
                self.at(pos, message);
            }
        }
    }

    /// DESIGN.md, "nobody is kept from 911".
    fn safety(&mut self, sites: &[Site<'a>]) {
        let f = self.f;
        let ek = f.defaults.emergency_key.to_string();
        let screening = f.screening.as_str();
        // (a) The screening menu comes right after the language choice.
        if f.start != f.screening && f.menus.contains_key(&f.start) {
            for s in self.menu_actions(sites, &f.start) {
                let what = match s.action {
                    Action::Goto(m) if m != screening => format!("goes to \"{m}\""),
                    Action::Language(l) if l.goto != screening => {
                        format!("goes to \"{}\"", l.goto)
                    }
                    Action::Top => "goes to the main menu".into(),
                    Action::Ticket(_) => "files a ticket".into(),
                    Action::Status => "reads a request status".into(),
                    Action::Transfer(t) => format!("transfers to \"{}\"", t.to),
                    _ => continue,
                };
                let path = goto_path(&s.path, s.action);
                let inherited = if s.slot == Slot::DefaultOnExhausted {
                    " (defaults.on_exhausted applies to the start menu too)"
                } else {
                    ""
                };
                self.at_value(
                    &path,
                    format!("callers must reach the screening menu \"{screening}\" right after the language choice, but this {what} from the start menu \"{}\"{inherited}", f.start),
                );
            }
        }
        // (b) The screening menu offers the emergency key.
        if let Some(m) = f.menus.get(screening) {
            if !m.entries.contains_key(&ek) {
                self.at_key(
                    &["menus", screening, "entries"],
                    format!(
                        "the screening menu \"{screening}\" must send the emergency key {ek} to emergency"
                    ),
                );
            }
        }
        // (c) Nobody shadows the emergency key after the language choice.
        for (id, m) in &f.menus {
            if *id == f.start {
                continue;
            }
            if let Some(a) = m.entries.get(&ek) {
                if !matches!(a, Action::Emergency(_)) {
                    self.at_key(
                        &["menus", id, "entries", &ek],
                        format!(
                            "key {ek} is the emergency key and must redirect to 911 in every menu"
                        ),
                    );
                }
            }
        }
    }

    /// The screening menu's `on_timeout` goto, else its first `goto` entry in the file.
    fn main_menu(&mut self) -> Option<String> {
        let f = self.f;
        let m = f.menus.get(&f.screening)?;
        if let Some(Action::Goto(target)) = &m.on_timeout {
            return Some(target.clone());
        }
        let entries_path = ["menus", f.screening.as_str(), "entries"];
        let in_file_order: Vec<String> = self
            .t
            .find(&entries_path)
            .value
            .map(|v| self.t.children(v))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, _)| k.and_then(|k| self.t.scalar(k)).map(str::to_owned))
            .collect();
        let keys = in_file_order.iter().chain(m.entries.keys());
        for key in keys {
            if let Some(Action::Goto(target)) = m.entries.get(key) {
                return Some(target.clone());
            }
        }
        self.at_key(
            &["menus", &f.screening],
            format!("the screening menu \"{}\" must lead to the main menu with a goto (its on_timeout or an entry); \"top\" goes there", f.screening),
        );
        None
    }

    /// Unreachable menus, and reachable menus from which no exit can be reached.
    fn reachability(&mut self, sites: &[Site<'a>], main: Option<&str>) {
        let f: &'a MenuFile = self.f;
        if !f.menus.contains_key(&f.start) {
            return;
        }
        let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for id in f.menus.keys() {
            let set = edges.entry(id.as_str()).or_default();
            for s in self.menu_actions(sites, id) {
                if let Some(t) = goto_target(s.action) {
                    if f.menus.contains_key(t) {
                        set.insert(t);
                    }
                }
            }
        }
        let reachable = reach(&edges, &f.start);
        for id in f.menus.keys() {
            if !reachable.contains(id.as_str()) {
                self.at_key(
                    &["menus", id],
                    format!(
                        "menu \"{id}\" is not reachable from the start menu \"{}\"",
                        f.start
                    ),
                );
            }
        }
        // Ways out for the exit analysis: `top` goes to the main menu, `back` to a menu that
        // leads here (the built-in back key is not counted: it would hide every loop).
        let mut preds: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (from, tos) in &edges {
            for to in tos {
                preds.entry(to).or_default().insert(from);
            }
        }
        let mut out = edges.clone();
        let mut exit: HashSet<&str> = HashSet::new();
        for id in f.menus.keys() {
            for s in self.menu_actions(sites, id) {
                if is_exit(s.action) {
                    exit.insert(id.as_str());
                }
                match s.action {
                    Action::Top => {
                        if let Some(m) = main.filter(|m| f.menus.contains_key(*m)) {
                            if let Some((k, _)) = f.menus.get_key_value(m) {
                                out.entry(id.as_str()).or_default().insert(k.as_str());
                            }
                        }
                    }
                    Action::Back => {
                        let p = preds.get(id.as_str()).cloned().unwrap_or_default();
                        out.entry(id.as_str()).or_default().extend(p);
                    }
                    _ => {}
                }
            }
        }
        let can_exit = can_reach(&out, &exit);
        for id in f.menus.keys() {
            if reachable.contains(id.as_str()) && !can_exit.contains(id.as_str()) {
                self.at_key(
                    &["menus", id],
                    format!("menu \"{id}\" cannot reach any ticket, status, queue, emergency or hangup (callers would be stuck)"),
                );
            }
        }
    }
}

/// Menus reachable from `start`.
fn reach<'a>(edges: &BTreeMap<&'a str, BTreeSet<&'a str>>, start: &'a str) -> HashSet<&'a str> {
    let mut seen = HashSet::from([start]);
    let mut todo = VecDeque::from([start]);
    while let Some(m) = todo.pop_front() {
        for &n in edges.get(m).into_iter().flatten() {
            if seen.insert(n) {
                todo.push_back(n);
            }
        }
    }
    seen
}

/// Menus from which one of `targets` can be reached (the targets included).
fn can_reach<'a>(
    edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    targets: &HashSet<&'a str>,
) -> HashSet<&'a str> {
    let mut reverse: HashMap<&str, Vec<&str>> = HashMap::new();
    for (&from, tos) in edges {
        for &to in tos {
            reverse.entry(to).or_default().push(from);
        }
    }
    let mut seen = targets.clone();
    let mut todo: VecDeque<&str> = targets.iter().copied().collect();
    while let Some(m) = todo.pop_front() {
        for &n in reverse.get(m).into_iter().flatten() {
            if seen.insert(n) {
                todo.push_back(n);
            }
        }
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// Digit-entry patterns.

/// Lengths a pattern can match, as a bit set: bit `i` is a match of `i` keys, bit
/// [`LEN_MORE`] is "more than [`MAX_DIGITS`]".
type Lens = u64;
const LEN_MORE: u32 = MAX_DIGITS as u32 + 1;
/// Past this many repetitions the length set no longer changes (see [`repeat`]).
const STABLE_POWER: u32 = LEN_MORE + 1;

fn bit(n: usize) -> Lens {
    1 << n.min(LEN_MORE as usize)
}

/// Lengths of `a` followed by `b`.
fn concat(a: Lens, b: Lens) -> Lens {
    let mut out = 0;
    for i in 0..=LEN_MORE {
        if a & (1 << i) == 0 {
            continue;
        }
        for j in 0..=LEN_MORE {
            if b & (1 << j) != 0 {
                out |= bit((i + j) as usize);
            }
        }
    }
    out
}

/// Lengths of `s` repeated `min..=max` times. `s^k` is the same set for every
/// `k >= STABLE_POWER`: with 0 in `s` the powers only grow (34 bits, so they stop growing
/// by then); without it every length is past [`MAX_DIGITS`].
fn repeat(s: Lens, min: u32, max: Option<u32>) -> Lens {
    let lo = min.min(STABLE_POWER);
    let hi = max.unwrap_or(u32::MAX).min(STABLE_POWER);
    let mut power: Lens = 1;
    for _ in 0..lo {
        power = concat(power, s);
    }
    let mut out = 0;
    for _ in lo..=hi {
        out |= power;
        power = concat(power, s);
    }
    out
}

/// Lengths of the strings of `keys` the expression matches in full.
fn lengths(h: &regex_syntax::hir::Hir, keys: &[char]) -> Lens {
    use regex_syntax::hir::{Class, HirKind};
    match h.kind() {
        HirKind::Empty | HirKind::Look(_) => bit(0),
        HirKind::Literal(lit) => match std::str::from_utf8(&lit.0) {
            Ok(s) if s.chars().all(|c| keys.contains(&c)) => bit(s.chars().count()),
            _ => 0,
        },
        HirKind::Class(Class::Unicode(c)) => {
            let any = keys
                .iter()
                .any(|&k| c.ranges().iter().any(|r| r.start() <= k && k <= r.end()));
            if any {
                bit(1)
            } else {
                0
            }
        }
        HirKind::Class(Class::Bytes(c)) => {
            let any = keys
                .iter()
                .filter_map(|&k| u8::try_from(k).ok())
                .any(|k| c.ranges().iter().any(|r| r.start() <= k && k <= r.end()));
            if any {
                bit(1)
            } else {
                0
            }
        }
        HirKind::Repetition(r) => repeat(lengths(&r.sub, keys), r.min, r.max),
        HirKind::Capture(c) => lengths(&c.sub, keys),
        HirKind::Concat(hs) => hs
            .iter()
            .fold(bit(0), |acc, h| concat(acc, lengths(h, keys))),
        HirKind::Alternation(hs) => hs.iter().fold(0, |acc, h| acc | lengths(h, keys)),
    }
}

fn keys_text(keys: &[char]) -> String {
    let digits = ('0'..='9').all(|d| keys.contains(&d));
    let mut parts: Vec<String> = Vec::new();
    if digits {
        parts.push("0-9".into());
    }
    parts.extend(
        keys.iter()
            .filter(|k| !(digits && k.is_ascii_digit()))
            .map(|k| k.to_string()),
    );
    parts.join(", ")
}

/// Check a digit-entry pattern: it parses, and (when `lengths` is `Some((min, max))`) it can
/// match in full some entry of `min..=max` of these keys.
fn check_pattern(
    pattern: &str,
    lengths_allowed: Option<(usize, usize)>,
    keys: &[char],
) -> Result<(), String> {
    let hir = regex_syntax::Parser::new().parse(pattern).map_err(|e| {
        let why = match &e {
            regex_syntax::Error::Parse(e) => e.kind().to_string(),
            regex_syntax::Error::Translate(e) => e.kind().to_string(),
            other => other.to_string(),
        };
        format!(
            "pattern \"{pattern}\" is not a valid regular expression: {}",
            why.replace('\n', " ")
        )
    })?;
    let Some((min, max)) = lengths_allowed else {
        return Ok(());
    };
    let props = hir.properties();
    if let Some(need) = props.minimum_len().filter(|&n| n > max) {
        return Err(format!(
            "pattern \"{pattern}\" cannot match: it needs at least {need} keys and max_digits is {max}"
        ));
    }
    if let Some(most) = props.maximum_len().filter(|&n| n < min) {
        return Err(format!(
            "pattern \"{pattern}\" cannot match: it allows at most {most} keys and min_digits is {min}"
        ));
    }
    let wanted = (min..=max).fold(0, |acc, n| acc | bit(n));
    if lengths(&hir, keys) & wanted == 0 {
        return Err(format!(
            "pattern \"{pattern}\" cannot match any entry of {min} to {max} phone keys ({})",
            keys_text(keys)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGITS: &[char] = &['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '*'];

    fn all_prompts(langs: &[&str]) -> PromptIndex {
        let names = [
            "language_menu",
            "screening",
            "main_menu",
            "invalid_entry",
            "no_entry",
            "enter_zip",
            "invalid_zip",
            "record_description",
            "beep",
            "recycling_info",
        ]
        .iter()
        .copied()
        .chain(engine_prompts());
        PromptIndex::from_names(
            names.flat_map(|n| langs.iter().map(move |l| (l.to_string(), n.to_string()))),
        )
    }

    fn check(text: &str) -> Result<LoadedMenu, Vec<Problem>> {
        check_text(Path::new("t.yaml"), text, &all_prompts(&["en", "es"]))
    }

    const GOOD: &str = "\
languages: [en, es]
start: language
screening: screening
menus:
  language:
    greet_long: language_menu
    on_timeout: {language: {set: en, goto: screening}}
    entries:
      '1': {language: {set: en, goto: screening}}
      '2': {language: {set: es, goto: screening}}
  screening:
    greet_long: screening
    on_timeout: {goto: main}
    entries:
      '1': {goto: main}
      '9': emergency
  main:
    greet_long: main_menu
    entries:
      '1': {ticket: {service: pothole, name: Pothole}}
      '2': {info: recycling_info}
      '9': emergency
";

    #[test]
    fn a_good_menu_loads_with_its_main_menu() {
        let m = check(GOOD).unwrap();
        assert_eq!(m.main, "main");
        assert_eq!(m.path, Path::new("t.yaml"));
    }

    #[test]
    fn tree_positions_are_one_based() {
        let t = Tree::parse(GOOD);
        assert!(t.duplicates.is_empty() && t.error.is_none());
        assert_eq!(t.key_pos(&["menus", "main", "entries", "9"]), (22, 7));
        assert_eq!(
            t.value_pos(&["menus", "screening", "on_timeout", "goto"]),
            (13, 24)
        );
        assert_eq!(t.value_pos(&["languages", "1"]), (1, 17));
        // A missing leaf falls back to the deepest part that exists.
        assert_eq!(t.key_pos(&["menus", "main", "nope"]), (17, 3));
    }

    #[test]
    fn duplicate_scan_finds_keys_serde_would_merge() {
        let t = Tree::parse("a:\n  '1': x\n  2: y\n  1: z\nb: [1, 1]\nb: 2\n");
        let msgs: Vec<_> = t
            .duplicates
            .iter()
            .map(|p| (p.line, p.column, p.message.as_str()))
            .collect();
        assert_eq!(
            msgs,
            [
                (4, 3, "duplicate key \"1\" (first at line 2)"),
                (6, 1, "duplicate key \"b\" (first at line 5)"),
            ]
        );
    }

    #[test]
    fn duplicate_scan_survives_a_syntax_error() {
        let t = Tree::parse("a: 1\na: 2\nb: [\n");
        assert_eq!(t.duplicates.len(), 1);
        assert!(t.error.is_some());
    }

    #[test]
    fn aliases_resolve_for_lookups() {
        let t = Tree::parse("x: &a {goto: m}\ny: *a\n");
        assert_eq!(t.value_pos(&["y", "goto"]), (1, 14));
    }

    #[test]
    fn patterns() {
        let ok = |p, min, max| check_pattern(p, Some((min, max)), DIGITS);
        assert_eq!(ok("^[0-9]{5}$", 5, 5), Ok(()));
        assert_eq!(ok(r"^\d{5}(\d{4})?$", 5, 9), Ok(()));
        assert_eq!(ok("^(12|[0-9]{8})$", 1, 8), Ok(()));
        assert_eq!(ok("^1*$", 1, 32), Ok(()));
        assert_eq!(ok("^[0-9]+$", 32, 32), Ok(()));
        assert_eq!(ok(r"^\*?[0-9]{3}$", 3, 4), Ok(()));
        let e = ok("^[0-9]{6}$", 1, 5).unwrap_err();
        assert!(
            e.contains("cannot match") && e.contains("at least 6"),
            "{e}"
        );
        let e = ok("^[a-z]{5}$", 5, 5).unwrap_err();
        assert!(e.contains("cannot match any entry of 5 to 5"), "{e}");
        // Lengths in between two branches.
        let e = ok("^([0-9]{2}|[0-9]{8})$", 4, 6).unwrap_err();
        assert!(e.contains("cannot match any entry"), "{e}");
        let e = ok("^[0-9]{1,3}$", 5, 9).unwrap_err();
        assert!(e.contains("at most 3"), "{e}");
        // The terminator never reaches the pattern.
        let e = ok("^#[0-9]$", 2, 2).unwrap_err();
        assert!(e.contains("cannot match"), "{e}");
        let e = ok("^[0-9", 1, 5).unwrap_err();
        assert!(e.contains("not a valid regular expression"), "{e}");
        assert!(!e.contains('\n'));
        // Huge repetitions stay cheap.
        assert!(ok("^(0{0,1000}){1000}$", 1, 5).is_ok());
        assert!(ok("^(0{1000}){1000}$", 1, 5).is_err());
    }

    #[test]
    fn repetition_lengths() {
        assert_eq!(repeat(bit(1), 2, Some(3)), bit(2) | bit(3));
        assert_eq!(repeat(bit(0) | bit(2), 0, None) & bit(3), 0);
        assert_ne!(repeat(bit(0) | bit(2), 0, None) & bit(32), 0);
        assert_eq!(repeat(bit(1), 40, None), bit(33));
        assert_eq!(repeat(0, 0, Some(5)), bit(0));
        assert_eq!(repeat(0, 1, Some(5)), 0);
    }

    #[test]
    fn reachability_helpers() {
        let mut e: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        e.entry("a").or_default().insert("b");
        e.entry("b").or_default().insert("c");
        e.entry("c").or_default().insert("b");
        e.entry("d").or_default().insert("a");
        let r = reach(&e, "a");
        assert_eq!(r, HashSet::from(["a", "b", "c"]));
        let exits = HashSet::from(["a"]);
        assert_eq!(can_reach(&e, &exits), HashSet::from(["a", "d"]));
    }

    #[test]
    fn loops_without_exit_and_back_edges() {
        // `back` from the loop reaches main, so nothing is stuck.
        let text = GOOD.replace("      '2': {info: recycling_info}\n", "      '2': {goto: loop}\n")
            + "  loop:\n    greet_long: main_menu\n    on_exhausted: {goto: loop}\n    entries:\n      '1': {info: recycling_info}\n      '2': back\n";
        check(&text).unwrap();
        let stuck = text.replace("      '2': back\n", "      '2': repeat\n");
        let p = check(&stuck).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].message.contains("menu \"loop\" cannot reach"), "{p:?}");
    }

    #[test]
    fn defaulted_prompts_are_shown_where_they_are_left_out() {
        let mut prompts = all_prompts(&["en", "es"]);
        prompts = PromptIndex::from_names(
            prompts
                .by_lang
                .iter()
                .flat_map(|(l, names)| names.iter().map(move |n| (l.clone(), n.clone())))
                .filter(|(l, n)| !(l == "es" && (n == "invalid_entry" || n == "invalid_zip"))),
        );
        // Not written anywhere: the defaults are reported at `languages`.
        let p = check_text(Path::new("t"), GOOD, &prompts).unwrap_err();
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.line, p.column, p.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 1, "prompt \"invalid_entry\" is missing for language es (the default defaults.invalid_prompt)"),
                (1, 1, "prompt \"invalid_zip\" is missing for language es (the default defaults.ticket.collect.0.invalid_prompt)"),
            ]
        );
        // A collect item that leaves out invalid_prompt: reported at that item.
        let text = GOOD.replace(
            "      '1': {ticket: {service: pothole, name: Pothole}}\n",
            "      '1': {ticket: {service: pothole, name: Pothole, steps: {collect: [{field: zipcode, prompt: enter_zip, max_digits: 5}]}}}\n",
        );
        let p = check_text(Path::new("t"), &text, &prompts).unwrap_err();
        assert!(
            p.iter().any(|p| (p.line, p.column) == (20, 73)
                && p.message == "prompt \"invalid_entry\" is missing for language es (the default invalid_prompt)"),
            "{p:?}"
        );
    }

    #[test]
    fn misspelt_queue_fields_are_caught() {
        let text = GOOD.replace(
            "      '2': {info: recycling_info}\n",
            "      '2': {queue: {queue: general, skil: es}}\n      '3': {queue: {queue: general, skill: es}}\n",
        );
        let p = check(&text).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].line, p[0].column), (21, 37));
        assert!(p[0].message.contains("unknown field \"skil\" in queue"));
    }

    #[test]
    fn main_menu_is_the_first_goto_in_file_order() {
        let text = GOOD
            .replace("    on_timeout: {goto: main}\n", "")
            .replace(
                "      '1': {goto: main}\n      '9': emergency\n",
                "      '9': emergency\n      '2': {goto: main}\n      '1': {goto: other}\n",
            )
            .replace(
                "  main:\n",
                "  other:\n    greet_long: main_menu\n    entries: {'1': status}\n  main:\n",
            );
        assert_eq!(check(&text).unwrap().main, "main");
        let none = GOOD
            .replace("    on_timeout: {goto: main}\n", "")
            .replace("      '1': {goto: main}\n", "      '1': status\n");
        let p = check(&none).unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.message.contains("must lead to the main menu")),
            "{p:?}"
        );
    }

    #[test]
    fn a_house_number_ticket_needs_its_prompts() {
        let text = GOOD.replace(
            "{ticket: {service: pothole, name: Pothole}}",
            "{ticket: {service: pothole, name: Pothole, house_number: true}}",
        );
        let p = check(&text).unwrap_err();
        let messages: Vec<&str> = p.iter().map(|p| p.message.as_str()).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("\"enter_house_number\" is missing"))
                && messages
                    .iter()
                    .any(|m| m.contains("\"record_street\" is missing")),
            "{messages:?}"
        );
        let mut with = all_prompts(&["en", "es"]);
        for lang in ["en", "es"] {
            let names = with.by_lang.entry(lang.into()).or_default();
            names.insert("enter_house_number".into());
            names.insert("record_street".into());
        }
        assert!(check_text(Path::new("t.yaml"), &text, &with).is_ok());
    }

    #[test]
    fn duplicate_windows_out_of_range_are_located() {
        let text = format!("{GOOD}repeat_callers: true\nduplicates: {{days: 0}}\n").replace(
            "{service: pothole, name: Pothole}",
            "{service: pothole, name: Pothole, duplicates: {days: 400}}",
        );
        let p = check(&text).unwrap_err();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().all(|p| p.message.contains("1 to 365")), "{p:?}");
        let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
        assert!(lines.contains(&20) && lines.contains(&24), "{p:?}");
        let ok = format!("{GOOD}repeat_callers: true\nduplicates: {{days: 7}}\n");
        assert!(check(&ok).is_ok());
    }

    #[test]
    fn missing_language_reported_once() {
        let p = check_text(Path::new("t"), GOOD, &all_prompts(&["en"])).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].line, p[0].column), (1, 17));
        assert!(p[0]
            .message
            .contains("no prompts at all for language \"es\""));
    }

    #[test]
    fn errors_display_one_line_each() {
        let e = MenuError::Invalid {
            path: "m.yaml".into(),
            problems: vec![
                Problem {
                    line: 1,
                    column: 2,
                    message: "a".into(),
                },
                Problem {
                    line: 3,
                    column: 4,
                    message: "b".into(),
                },
            ],
        };
        assert_eq!(e.to_string(), "m.yaml:1:2: a\nm.yaml:3:4: b");
    }
}
