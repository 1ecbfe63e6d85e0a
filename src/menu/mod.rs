//! The menu language and the engine that walks callers through it.
//!
//! Ground floor: imports neither `sip` nor `media` nor `call`. [`engine`] is sans-IO: digits,
//! timeouts and prompt-done events go in, actions come out. [`say`] turns numbers into the
//! prompts that read them, per language.

pub mod bulletin;
pub mod engine;
pub(crate) mod say;
pub mod schedule;
pub mod schema;
pub mod validate;
