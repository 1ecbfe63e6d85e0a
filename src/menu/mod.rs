//! The menu language and the engine that walks callers through it.
//!
//! Ground floor: imports neither `sip` nor `media` nor `call`. [`engine`] is sans-IO: digits,
//! timeouts and prompt-done events go in, actions come out.

pub mod engine;
pub mod schema;
pub mod validate;
