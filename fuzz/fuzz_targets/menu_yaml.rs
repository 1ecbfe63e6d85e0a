//! Menu YAML: the schema parser and the full `ivr311 check` validation.
#![no_main]

use ivr311::menu::{schema, validate};
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;

/// The repository's real prompt set (so valid menus validate), plus a fixed fallback.
fn prompts() -> &'static validate::PromptIndex {
    static INDEX: OnceLock<validate::PromptIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prompts");
        validate::PromptIndex::from_dir(&dir).unwrap_or_else(|_| {
            validate::PromptIndex::from_names(
                ["main_menu", "goodbye", "invalid_entry", "no_entry"]
                    .iter()
                    .flat_map(|n| ["en", "es"].map(|l| (l.to_owned(), (*n).to_owned()))),
            )
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = schema::parse(text);
    let _ = validate::check_text(Path::new("fuzz.yaml"), text, prompts());
});
