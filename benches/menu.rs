//! The menu engine: one `Engine::handle` step on the shipped `menus/311.yaml`, loaded and
//! validated once outside the timing (as the server does at start-up).
//!
//! Run: `cargo bench --bench menu`. See BENCHMARKS.md for figures.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ivr311::menu::engine::{Engine, Input, Output};
use ivr311::menu::schema::MenuFile;
use ivr311::menu::validate::{load, PromptIndex};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

mod common;
use common::measured;

/// An engine for a new caller who chose English (1) and passed screening (1): in the main menu.
fn in_main_menu(menu: &Arc<MenuFile>, main: &str) -> Engine {
    let mut e = Engine::new(menu.clone(), main.to_owned());
    let now = Instant::now();
    e.handle(now, Input::Start);
    e.handle(now, Input::Digit('1'));
    e.handle(now, Input::Digit('1'));
    assert_eq!(e.current_menu(), Some(main));
    e
}

fn engine(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let prompts = PromptIndex::from_dir(&root.join("prompts")).expect("prompts");
    let loaded = load(&root.join("menus/311.yaml"), &prompts).expect("shipped menu is valid");
    let menu = Arc::new(loaded.file);
    let main = loaded.main;

    // What the step does: barge-in, then the streets menu's greeting.
    let mut e = in_main_menu(&menu, &main);
    let out = e.handle(Instant::now(), Input::Digit('1'));
    assert!(out.contains(&Output::StopPlayback), "{out:?}");
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Play(p) if p.iter().any(|n| n.starts_with("streets")))),
        "{out:?}"
    );
    assert_eq!(e.current_menu(), Some("streets"));

    // The engine only compares key times with its own: any instant will do.
    let t0 = Instant::now();
    let mut g = c.benchmark_group("menu");
    g.bench_function("main_menu_digit_1_to_streets", |b| {
        b.iter_batched_ref(
            || in_main_menu(&menu, &main),
            |e| measured(|| e.handle(black_box(t0), black_box(Input::Digit('1')))),
            BatchSize::SmallInput,
        )
    });
    // An invalid key in the main menu: the "not a valid choice" path (stays in the menu).
    g.bench_function("main_menu_invalid_key_7", |b| {
        b.iter_batched_ref(
            || in_main_menu(&menu, &main),
            |e| measured(|| e.handle(black_box(t0), black_box(Input::Digit('7')))),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
