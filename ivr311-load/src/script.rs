//! Call scripts: what a caller does after the answer, as data (a list of timed steps) that the
//! worker walks. No sockets or clocks here.
//!
//! - `asterisk`: the call used to measure Asterisk on this machine: digit 1 at 1.5 s and digit
//!   1 again at 3.5 s (two distinct RFC 4733 events), hang up at 8 s.
//! - `pothole`: derived from the menu YAML: the keys that reach the `pothole` ticket from the
//!   start menu (language, screening, main, streets, pothole), a valid ZIP code, the record
//!   step's end key pressed during its prompt (skip the description), then listen to the
//!   ticket number read-back and hang up.
//! - `operator`: derived from the menu YAML: the keys that reach `{queue: general}` (language
//!   1, screening 1, main 0 in the shipped menu), then wait for an operator (the generator's
//!   agents) to be bridged in, talk for a while and hang up.

use ivr311::menu::schema::{Action as MenuAction, MenuFile, TicketSteps};
use std::collections::{BTreeSet, VecDeque};

/// When a step happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// This many ms after the call was answered (our ACK).
    FromAnswer(u32),
    /// This many ms after the previous step settled: the server's response to the previous
    /// key when one was expected (or its timeout), else the first End packet of that key.
    AfterPrevious(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Press a key (RFC 4733). `expect_response`: the server should start a new prompt (RTP
    /// marker bit) in reply; the latency is measured and a missing reply counted.
    Press { key: char, expect_response: bool },
    /// Wait until audio from an operator (one of our agents) arrives through the server; the
    /// next step is timed from that. No operator audio within `timeout_ms`: the call failed
    /// (not bridged) and hangs up.
    AwaitBridge { timeout_ms: u32 },
    /// Send BYE.
    Hangup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub at: At,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub name: String,
    pub steps: Vec<Step>,
}

/// Why a script cannot be built from a menu.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("no key path from menu {start:?} reaches a ticket with service {service:?}")]
    NoPath { start: String, service: String },
    #[error(
        "cannot make up digits for field {field:?} ({min}..={max} digits, pattern {pattern:?})"
    )]
    Digits {
        field: String,
        min: usize,
        max: usize,
        pattern: Option<String>,
    },
    #[error("no key path from menu {start:?} reaches the operator queue {queue:?}")]
    NoQueue { start: String, queue: String },
    #[error("the script must end with a hangup")]
    NoHangup,
}

impl Script {
    /// The Asterisk reference call.
    pub fn asterisk() -> Script {
        Script {
            name: "asterisk".into(),
            steps: vec![
                press_at(1500, '1'),
                press_at(3500, '1'),
                Step {
                    at: At::FromAnswer(8000),
                    action: Action::Hangup,
                },
            ],
        }
    }

    /// Hang up at `ms` after the answer instead of where the script says.
    pub fn with_hangup_at(mut self, ms: u32) -> Script {
        if let Some(last) = self.steps.last_mut() {
            if last.action == Action::Hangup {
                last.at = At::FromAnswer(ms);
            }
        }
        self
    }

    pub fn check(&self) -> Result<(), ScriptError> {
        match self.steps.last() {
            Some(Step {
                action: Action::Hangup,
                ..
            }) => Ok(()),
            _ => Err(ScriptError::NoHangup),
        }
    }

    /// The keys pressed, in order (for the report).
    pub fn keys(&self) -> String {
        self.steps
            .iter()
            .filter_map(|s| match s.action {
                Action::Press { key, .. } => Some(key),
                Action::AwaitBridge { .. } | Action::Hangup => None,
            })
            .collect()
    }

    /// How many presses expect a response.
    pub fn responses_expected(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| {
                matches!(
                    s.action,
                    Action::Press {
                        expect_response: true,
                        ..
                    }
                )
            })
            .count()
    }

    /// Whether the callers wait for an operator (the run needs agents).
    pub fn bridges(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.action, Action::AwaitBridge { .. }))
    }

    /// Reach the operator queue `queue` through `menu` (the shortest key path from the start
    /// menu, first language, each key pressed after the menu it leads to has started), wait
    /// up to `bridge_timeout_ms` for an operator's audio, talk `talk_ms`, hang up.
    pub fn operator(
        menu: &MenuFile,
        queue: &str,
        talk_ms: u32,
        bridge_timeout_ms: u32,
    ) -> Result<Script, ScriptError> {
        const MENU_KEY_DELAY: u32 = 400;
        let (keys, _) = key_path(
            menu,
            |a| matches!(a, MenuAction::Queue(q) if q.queue == queue),
        )
        .ok_or_else(|| ScriptError::NoQueue {
            start: menu.start.clone(),
            queue: queue.into(),
        })?;
        let last = keys.len() - 1;
        let mut steps = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            steps.push(Step {
                at: if i == 0 {
                    At::FromAnswer(1000)
                } else {
                    At::AfterPrevious(MENU_KEY_DELAY)
                },
                // The key into the queue gets hold music or an operator, not a menu prompt:
                // its answer is the operator's audio (AwaitBridge).
                action: Action::Press {
                    key: *k,
                    expect_response: i != last,
                },
            });
        }
        steps.push(Step {
            at: At::AfterPrevious(0),
            action: Action::AwaitBridge {
                timeout_ms: bridge_timeout_ms,
            },
        });
        steps.push(Step {
            at: At::AfterPrevious(talk_ms),
            action: Action::Hangup,
        });
        Ok(Script {
            name: format!("operator (queue {queue}, keys from the menu)"),
            steps,
        })
    }

    /// File a `service` ticket through `menu`: the shortest key path from the start menu
    /// (choosing the first language, never an emergency entry), each key pressed after the
    /// menu it leads to has started playing; then the ticket's digit fields, the record end key
    /// during the record prompt, and hang up `listen_ms` after the ticket read-back starts.
    /// After a field that fills its `max_digits` the end key waits out the inter-digit
    /// timeout: pressed sooner, the server takes it for that field's terminator.
    pub fn pothole(menu: &MenuFile, service: &str, listen_ms: u32) -> Result<Script, ScriptError> {
        const MENU_KEY_DELAY: u32 = 400;
        const DIGIT_GAP: u32 = 200;
        let (keys, steps_spec) = ticket_path(menu, service).ok_or_else(|| ScriptError::NoPath {
            start: menu.start.clone(),
            service: service.into(),
        })?;
        let mut steps = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            steps.push(Step {
                at: if i == 0 {
                    At::FromAnswer(1000)
                } else {
                    At::AfterPrevious(MENU_KEY_DELAY)
                },
                action: Action::Press {
                    key: *k,
                    expect_response: true,
                },
            });
        }
        // Whether the last field filled all its digits (no terminator pressed).
        let mut ended_full = false;
        for c in &steps_spec.collect {
            let mut digits = if c.field == "zipcode" && (c.min_digits..=c.max_digits).contains(&5) {
                "94103".to_string()
            } else {
                "1".repeat(c.min_digits.max(1))
            };
            if let Some(p) = &c.pattern {
                let ok = regex::Regex::new(p).is_ok_and(|re| re.is_match(&digits));
                if !ok {
                    return Err(ScriptError::Digits {
                        field: c.field.clone(),
                        min: c.min_digits,
                        max: c.max_digits,
                        pattern: c.pattern.clone(),
                    });
                }
            }
            ended_full = digits.len() >= c.max_digits;
            if !ended_full {
                digits.push(c.terminator);
            }
            let count = digits.chars().count();
            for (di, d) in digits.chars().enumerate() {
                let last = di + 1 == count;
                // The last key of a field starts the next prompt (the next field, the record
                // prompt, or the filing); earlier keys only stop the field's prompt.
                let expect = last;
                steps.push(Step {
                    at: At::AfterPrevious(if di == 0 { MENU_KEY_DELAY } else { DIGIT_GAP }),
                    action: Action::Press {
                        key: d,
                        expect_response: expect,
                    },
                });
            }
        }
        if let Some(r) = &steps_spec.record {
            let claim_ms = (menu.defaults.inter_digit_timeout_seconds * 1000.0).ceil() as u32;
            let delay = if ended_full {
                MENU_KEY_DELAY + claim_ms
            } else {
                MENU_KEY_DELAY
            };
            steps.push(Step {
                at: At::AfterPrevious(delay),
                action: Action::Press {
                    key: r.end_key,
                    expect_response: true,
                },
            });
        }
        steps.push(Step {
            at: At::AfterPrevious(listen_ms),
            action: Action::Hangup,
        });
        Ok(Script {
            name: format!("{service} (keys from the menu)"),
            steps,
        })
    }
}

fn press_at(ms: u32, key: char) -> Step {
    Step {
        at: At::FromAnswer(ms),
        action: Action::Press {
            key,
            expect_response: true,
        },
    }
}

/// Breadth-first search over menu keys from the start menu to the ticket for `service`.
fn ticket_path(menu: &MenuFile, service: &str) -> Option<(Vec<char>, TicketSteps)> {
    let (keys, action) = key_path(
        menu,
        |a| matches!(a, MenuAction::Ticket(t) if t.service == service),
    )?;
    match action {
        MenuAction::Ticket(t) => {
            let steps = t.steps.clone().unwrap_or(menu.defaults.ticket.clone());
            Some((keys, steps))
        }
        _ => None,
    }
}

/// Breadth-first search over menu keys from the start menu (first language, no emergency
/// entries) to the first entry whose action satisfies `want`.
fn key_path(
    menu: &MenuFile,
    want: impl Fn(&MenuAction) -> bool,
) -> Option<(Vec<char>, &MenuAction)> {
    let first_language = menu.languages.first()?;
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([(menu.start.clone(), Vec::<char>::new())]);
    while let Some((id, keys)) = queue.pop_front() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let m = menu.menus.get(&id)?;
        for (key, action) in &m.entries {
            let Some(k) = key.chars().next().filter(|_| key.chars().count() == 1) else {
                continue;
            };
            let mut next = keys.clone();
            next.push(k);
            // A `when` is followed by its open branch: load is run in opening hours.
            let mut action = action;
            while let MenuAction::When(w) = action {
                action = &w.open;
            }
            if want(action) {
                return Some((next, action));
            }
            match action {
                MenuAction::Goto(to) => queue.push_back((to.clone(), next)),
                MenuAction::Language(l) if &l.set == first_language => {
                    queue.push_back((l.goto.clone(), next))
                }
                _ => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped_menu() -> MenuFile {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../menus/311.yaml");
        ivr311::menu::schema::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn pothole_keys_come_from_the_shipped_menu() {
        let s = Script::pothole(&shipped_menu(), "pothole", 5000).unwrap();
        // language 1, screening 1, main 1 (streets), streets 1 (pothole), ZIP, # skips the
        // description.
        assert_eq!(s.keys(), "111194103#");
        assert!(s.check().is_ok());
        assert_eq!(s.steps.first().unwrap().at, At::FromAnswer(1000));
        assert_eq!(s.steps.last().unwrap().action, Action::Hangup);
        // Menu keys, the last ZIP digit and # expect a new prompt; the first four ZIP digits
        // do not.
        assert_eq!(s.responses_expected(), 6);
        // The ZIP fills its five digits: # comes after the inter-digit timeout (3 s), or the
        // server would take it for the ZIP's terminator.
        let pound = s.steps.iter().rev().nth(1).unwrap();
        assert_eq!(
            pound.action,
            Action::Press {
                key: '#',
                expect_response: true
            }
        );
        assert_eq!(pound.at, At::AfterPrevious(3400));
    }

    #[test]
    fn other_services_and_missing_ones() {
        let m = shipped_menu();
        let s = Script::pothole(&m, "fallen_tree", 1000).unwrap();
        assert!(s.keys().starts_with("11141"), "{}", s.keys());
        assert!(matches!(
            Script::pothole(&m, "no_such_service", 1000),
            Err(ScriptError::NoPath { .. })
        ));
    }

    #[test]
    fn operator_keys_come_from_the_shipped_menu() {
        let s = Script::operator(&shipped_menu(), "general", 10_000, 20_000).unwrap();
        // language 1, screening 1, main 0 ({queue: general}).
        assert_eq!(s.keys(), "110");
        assert!(s.check().is_ok());
        assert!(s.bridges());
        assert_eq!(
            s.responses_expected(),
            2,
            "key 0 is answered by an operator"
        );
        assert_eq!(
            s.steps[3].action,
            Action::AwaitBridge { timeout_ms: 20_000 }
        );
        assert_eq!(s.steps[4].at, At::AfterPrevious(10_000));
        assert!(!Script::pothole(&shipped_menu(), "pothole", 1)
            .unwrap()
            .bridges());
        assert!(matches!(
            Script::operator(&shipped_menu(), "no_such_queue", 1, 1),
            Err(ScriptError::NoQueue { .. })
        ));
    }

    #[test]
    fn asterisk_reference_and_its_hangup_override() {
        let s = Script::asterisk();
        assert_eq!(s.keys(), "11");
        assert_eq!(s.steps[1].at, At::FromAnswer(3500));
        let s = s.with_hangup_at(30_000);
        assert_eq!(s.steps[2].at, At::FromAnswer(30_000));
    }
}
