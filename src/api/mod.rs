//! The HTTP API (axum): `/health` and `/health/ready` ([`health`]), Open311 GeoReport v2 under
//! `/open311/v2/` ([`open311`]), the admin API under `/admin/` and Prometheus metrics at
//! `/metrics` ([`admin`]), the operator console under `/console` ([`console`]), served by [`serve`] (header-read and idle timeouts, a connection cap).
//!
//! Reads state through shared handles ([`crate::call::CallRegistry`], the ticket store, the menu
//! holder, UA counters, heartbeats); never touches sockets of the SIP or media layers.

pub mod admin;
pub mod console;
pub mod health;
pub mod open311;
pub mod ratelimit;
pub mod serve;

pub use health::{Health, Readiness};

use crate::call::{CallRegistry, MenuHolder};
use crate::config::{AdminConfig, Open311Config};
use crate::dispatch::tickets::TicketStore;
use crate::sip::transport::TransportStats;
use crate::sip::ua::UaStats;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::Instant;

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<CallRegistry>,
    pub ua: Arc<UaStats>,
    pub transport: Arc<TransportStats>,
    pub started: Instant,
    pub tickets: TicketStore,
    /// The menu new calls start on (Open311 services are derived from it).
    pub menu: Arc<MenuHolder>,
    pub open311: Arc<Open311Config>,
    pub admin: Arc<AdminConfig>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub ports: Arc<crate::media::ports::PortPool>,
    /// Operator queues (none when no agents are configured).
    pub queues: Option<crate::dispatch::queue::QueueHandle>,
    /// What `/health/ready` reads.
    pub ready: Arc<health::ReadyState>,
    /// Where callers' recordings are (`storage.recordings_dir`), for the admin API.
    pub recordings: std::path::PathBuf,
    /// `POST requests` allowance per Open311 API key.
    pub open311_posts: Arc<std::sync::Mutex<ratelimit::KeyLimiter>>,
    /// The operator console's sessions and settings.
    pub console: Arc<console::Console>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/health/ready", get(health::ready))
        .nest("/open311/v2", open311::router())
        .merge(admin::router(state.clone()))
        .merge(console::router(state.clone()))
        .with_state(state)
}

/// Whether a secret someone gave (an admin token, an API key) is `expected`, compared as
/// SHA-256 digests in constant time: the time taken says nothing about how much of it, or
/// how much of its length, was right.
pub fn same_secret(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_exactly() {
        assert!(same_secret("s3cret", "s3cret"));
        for wrong in ["s3cre", "s3cret ", "S3cret", "", "s3cret\0"] {
            assert!(!same_secret(wrong, "s3cret"), "{wrong:?}");
        }
    }
}
