//! `ivr311 check` on the shipped menu and on one bad menu per kind of mistake
//! (`tests/fixtures/menus/*.yaml`): every problem, with its exact line and column, at once.

use ivr311::menu::schema::Action;
use ivr311::menu::validate::{self, engine_prompts, MenuError, Problem, PromptIndex};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn real_prompts() -> PromptIndex {
    PromptIndex::from_dir(&root().join("prompts")).expect("prompts/ is readable")
}

fn fixture(name: &str) -> PathBuf {
    root()
        .join("tests/fixtures/menus")
        .join(format!("{name}.yaml"))
}

fn problems_with(name: &str, prompts: &PromptIndex) -> Vec<Problem> {
    match validate::load(&fixture(name), prompts) {
        Ok(_) => panic!("{name}.yaml passed the check"),
        Err(MenuError::Invalid { problems, .. }) => problems,
        Err(e) => panic!("{name}.yaml: {e}"),
    }
}

/// Exactly these problems, in this order: (line, column, a piece of the message).
fn expect_with(name: &str, prompts: &PromptIndex, expected: &[(usize, usize, &str)]) {
    let got = problems_with(name, prompts);
    let shown = got
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        got.len(),
        expected.len(),
        "{name}.yaml: wrong number of problems:\n{shown}"
    );
    for (p, (line, column, text)) in got.iter().zip(expected) {
        assert_eq!(
            (p.line, p.column),
            (*line, *column),
            "{name}.yaml: wrong position for {text:?}:\n{shown}"
        );
        assert!(
            p.message.contains(text),
            "{name}.yaml:{line}:{column}: expected {text:?} in {:?}",
            p.message
        );
    }
}

fn expect(name: &str, expected: &[(usize, usize, &str)]) {
    expect_with(name, &real_prompts(), expected);
}

#[test]
fn the_shipped_menu_passes_with_the_real_prompts() {
    let menu = validate::load(&root().join("menus/311.yaml"), &real_prompts())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(menu.main, "main");
    let f = &menu.file;
    assert_eq!(f.languages, ["en", "es"]);
    assert_eq!(
        (f.start.as_str(), f.screening.as_str()),
        ("language", "screening")
    );
    let screening = &f.menus["screening"];
    assert!(matches!(screening.entries["9"], Action::Emergency(_)));
    assert_eq!(screening.on_timeout, Some(Action::Goto("main".into())));
    let main = &f.menus["main"];
    let keys: Vec<&str> = main.entries.keys().map(String::as_str).collect();
    assert_eq!(keys, ["0", "1", "2", "3", "4", "5", "6", "9"]);
    // Every ticket, with a description, in the order callers meet them.
    let mut services = Vec::new();
    for id in ["streets", "fallen_tree", "trash", "noise", "animals"] {
        for action in f.menus[id].entries.values() {
            if let Action::Ticket(t) = action {
                assert!(t.description.is_some() && !t.keywords.is_empty(), "{id}");
                assert!(t.agency.is_some(), "{id}");
                services.push(t.service.as_str());
            }
        }
    }
    assert_eq!(
        services,
        [
            "pothole",
            "streetlight",
            "graffiti",
            "fallen_tree",
            "missed_pickup",
            "bulky_item",
            "noise",
            "abandoned_vehicle",
            "blocked_driveway",
            "stray_animal",
            "dead_animal"
        ]
    );
}

#[test]
fn the_engine_prompts_exist_in_every_shipped_language() {
    let prompts = real_prompts();
    for lang in ["en", "es"] {
        for name in engine_prompts() {
            assert!(prompts.has(lang, name), "prompts/{lang}/{name}.wav");
        }
    }
}

#[test]
fn the_minimal_fixture_is_valid() {
    let m = validate::load(&fixture("valid_minimal"), &real_prompts())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.main, "main");
}

#[test]
fn every_fixture_has_a_test() {
    let known = [
        "bad_defaults_keys",
        "bad_key",
        "bad_limits",
        "bad_schedules",
        "bypass_screening",
        "crisis_on_timeout",
        "dangling_goto",
        "duplicate_field",
        "duplicate_key",
        "duplicate_service",
        "emergency_on_exhausted",
        "emergency_shadowed",
        "impossible_pattern",
        "loop_no_exit",
        "missing_prompt",
        "screening_missing",
        "screening_no_emergency",
        "screening_timeout_emergency",
        "several_problems",
        "syntax_error",
        "unknown_key",
        "unreachable_menu",
        "valid_minimal",
    ];
    let mut found: Vec<String> = std::fs::read_dir(root().join("tests/fixtures/menus"))
        .expect("fixtures")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".yaml"))
                .map(str::to_owned)
        })
        .collect();
    found.sort();
    assert_eq!(found, known);
}

#[test]
fn bad_schedules_and_when() {
    expect(
        "bad_schedules",
        &[
            (7, 16, "unknown time zone \"America/New_Yrok\""),
            (13, 18, "sat 12:00-14:00 overlaps the hours of \"sat\""),
            (14, 7, "\"tues\" is not a day"),
            (
                15,
                12,
                "02:30 does not exist on 2027-03-14 in America/Chicago",
            ),
            (16, 34, "\"12/26/2026\" is not a date"),
            (17, 32, "\"9:00-12:00\" is not a range of hours"),
            (33, 75, "on_timeout must not be emergency"),
            (36, 77, "no menu named \"after\""),
            (
                42,
                30,
                "no schedule named \"night\" (schedules: centre, weekend)",
            ),
        ],
    );
}

#[test]
fn crisis_line_on_timeout_or_exhausted() {
    expect(
        "crisis_on_timeout",
        &[
            (17, 48, "prompt \"no_such_prompt\" is missing"),
            (21, 17, "on_timeout must not transfer"),
            (22, 19, "on_exhausted must not transfer"),
        ],
    );
}

#[test]
fn unknown_key() {
    expect("unknown_key", &[(26, 5, "unknown field `greet_lng`")]);
}

#[test]
fn syntax_error_and_duplicate_key_are_both_reported() {
    expect(
        "syntax_error",
        &[
            (23, 7, "duplicate key \"0\" (first at line 22)"),
            (28, 79, "did not find expected ',' or ']'"),
        ],
    );
}

#[test]
fn duplicate_key() {
    // YAML keeps the last "1", so streets is no longer reachable either.
    expect(
        "duplicate_key",
        &[
            (23, 7, "duplicate key \"1\" (first at line 21)"),
            (
                25,
                3,
                "menu \"streets\" is not reachable from the start menu \"language\"",
            ),
        ],
    );
}

#[test]
fn duplicate_field_is_reported_once() {
    expect(
        "duplicate_field",
        &[(26, 5, "duplicate key \"greet_long\" (first at line 25)")],
    );
}

#[test]
fn dangling_goto() {
    expect("dangling_goto", &[(22, 19, "no menu named \"trahs\"")]);
}

#[test]
fn unreachable_menu() {
    expect(
        "unreachable_menu",
        &[(29, 3, "menu \"trash\" is not reachable from the start menu")],
    );
}

#[test]
fn loop_with_no_exit() {
    let stuck =
        "cannot reach any ticket, status, queue, emergency or hangup (callers would be stuck)";
    expect(
        "loop_no_exit",
        &[(30, 3, "menu \"loop_a\" "), (36, 3, "menu \"loop_b\" ")],
    );
    for p in problems_with("loop_no_exit", &real_prompts()) {
        assert!(p.message.ends_with(stuck), "{p}");
    }
}

#[test]
fn prompt_missing_in_one_language() {
    let dir = root().join("prompts");
    let mut names = Vec::new();
    for lang in ["en", "es"] {
        for e in std::fs::read_dir(dir.join(lang))
            .expect("prompts")
            .flatten()
        {
            if let Some(n) = e.file_name().to_str().and_then(|n| n.strip_suffix(".wav")) {
                if !(lang == "es" && n == "recycling_info") {
                    names.push((lang.to_owned(), n.to_owned()));
                }
            }
        }
    }
    let prompts = PromptIndex::from_names(names);
    expect_with(
        "missing_prompt",
        &prompts,
        &[(
            23,
            19,
            "prompt \"recycling_info\" is missing for language es",
        )],
    );
    // With every prompt there, the same file passes.
    validate::load(&fixture("missing_prompt"), &real_prompts()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn engine_prompts_are_reported_at_the_languages_key() {
    let prompts = PromptIndex::from_names(
        ["language_menu", "screening", "main_menu", "streets_menu"]
            .into_iter()
            .chain(["invalid_entry", "no_entry", "enter_zip", "invalid_zip"])
            .chain(["record_description", "beep"])
            .chain(engine_prompts().filter(|p| *p != "goodbye"))
            .flat_map(|n| {
                [
                    ("en".to_owned(), n.to_owned()),
                    ("es".to_owned(), n.to_owned()),
                ]
            }),
    );
    expect_with(
        "valid_minimal",
        &prompts,
        &[(
            2,
            1,
            "built-in prompt \"goodbye\" is missing for languages en, es",
        )],
    );
}

#[test]
fn impossible_patterns() {
    expect(
        "impossible_pattern",
        &[
            (36, 26, "pattern \"^[0-9]{6}$\" cannot match"),
            (41, 26, "pattern \"^[a-z]{5}$\" cannot match"),
        ],
    );
}

#[test]
fn screening_menu_missing() {
    let skip = "callers must reach the screening menu \"screening\" right after the language choice, but this goes to \"main\"";
    expect(
        "screening_missing",
        &[
            (4, 12, "screening menu \"screening\" does not exist"),
            (8, 44, skip),
            (10, 39, skip),
            (11, 39, skip),
        ],
    );
}

#[test]
fn screening_without_the_emergency_key() {
    expect(
        "screening_no_emergency",
        &[(
            15,
            5,
            "the screening menu \"screening\" must send the emergency key 9 to emergency",
        )],
    );
}

#[test]
fn a_language_that_skips_screening() {
    expect(
        "bypass_screening",
        &[(
            11,
            39,
            "must reach the screening menu \"screening\" right after the language choice",
        )],
    );
}

#[test]
fn emergency_key_shadowed() {
    expect(
        "emergency_shadowed",
        &[(
            28,
            7,
            "key 9 is the emergency key and must redirect to 911 in every menu",
        )],
    );
}

#[test]
fn emergency_on_exhausted() {
    expect(
        "emergency_on_exhausted",
        &[(26, 19, "on_exhausted must not be emergency")],
    );
}

#[test]
fn screening_timeout_must_not_dial_911() {
    expect(
        "screening_timeout_emergency",
        &[(
            14,
            17,
            "on_timeout must not be emergency: silence must not dial 911",
        )],
    );
}

#[test]
fn bad_entry_keys() {
    expect(
        "bad_key",
        &[
            (23, 7, "key \"10\" is not a single phone key"),
            (24, 7, "key \"x\" is not a single phone key"),
            (25, 7, "key \"#\" is the back key"),
        ],
    );
}

#[test]
fn bad_default_keys() {
    expect(
        "bad_defaults_keys",
        &[
            (6, 13, "back_key and repeat_key are both \"*\""),
            (7, 18, "emergency_key \"E\" is not a phone key"),
            (18, 5, "must send the emergency key E to emergency"),
        ],
    );
}

#[test]
fn service_codes() {
    expect(
        "duplicate_service",
        &[
            (
                24,
                31,
                "service \"pothole\" is already defined differently at line 23",
            ),
            (
                25,
                31,
                "service code \"Street-Light\" must use only a-z, 0-9 and _",
            ),
        ],
    );
}

#[test]
fn limits() {
    expect(
        "bad_limits",
        &[
            (
                6,
                20,
                "timeout_seconds must be more than 0 and less than 120 seconds (got 0)",
            ),
            (
                7,
                32,
                "inter_digit_timeout_seconds must be more than 0 and less than 120",
            ),
            (8, 17, "max_failures must be between 1 and 10 (got 0)"),
            (13, 21, "min_digits (6) is more than max_digits (5)"),
            (15, 21, "terminator \"x\" is not a phone key"),
            (18, 20, "max_seconds must be between 1 and 300 (got 600)"),
            (40, 19, "max_timeouts must be between 1 and 10 (got 11)"),
        ],
    );
}

#[test]
fn several_problems_are_reported_at_once() {
    expect(
        "several_problems",
        &[
            (11, 29, "language \"fr\" is not in languages [en, es]"),
            (15, 5, "must send the emergency key 9 to emergency"),
            (20, 19, "no menu named \"stretes\""),
            (22, 7, "key \"11\" is not a single phone key"),
            (24, 3, "menu \"streets\" is not reachable"),
            (27, 31, "service code \"pot hole\""),
        ],
    );
}

#[test]
fn errors_print_path_line_column_message() {
    let path = fixture("several_problems");
    let e = validate::load(&path, &real_prompts()).expect_err("invalid");
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines[2],
        format!("{}:20:19: no menu named \"stretes\"", path.display())
    );
}

#[test]
fn an_unreadable_file_is_an_io_error() {
    let e = validate::load(Path::new("/nonexistent/311.yaml"), &real_prompts()).expect_err("io");
    assert!(matches!(e, MenuError::Io { .. }), "{e}");
    assert!(e.to_string().starts_with("/nonexistent/311.yaml: "), "{e}");
}
