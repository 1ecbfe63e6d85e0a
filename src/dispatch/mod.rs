//! Where a call's outcome goes once the menu is done: tickets filed for the city, and the
//! audit of calls sent on to emergency services.
//!
//! [`tickets`] is the durable store (SQLite via sqlx; schema in `migrations/`) shared by
//! the call flow, which files tickets and audits emergency redirects, and the HTTP API,
//! which lists and updates them.

pub mod emergency;
pub mod numbers;
pub mod queue;
pub mod tickets;
