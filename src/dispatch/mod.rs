//! Where a call's outcome goes once the menu is done: tickets filed for the city, the audit
//! of calls sent on to emergency services, the operator queues, and the policies the call
//! follows (how to reach 911, which numbers may be called back).
//!
//! [`tickets`] is the durable store (SQLite via sqlx; schema in `migrations/`) shared by
//! the call flow, which files tickets and audits emergency redirects, and the HTTP API,
//! which lists and updates them. [`queue`] is sans-IO with a small tokio driver. Nothing here
//! touches SIP or a socket: calls ([`crate::call`]) act for dispatch through channels.

pub mod announcements;
pub(crate) mod cluster;
pub mod db;
pub mod emergency;
pub mod generate;
pub(crate) mod numbers;
pub mod outbox;
pub(crate) mod queue;
pub mod tickets;
