//! The HTTP API (axum): `/health` and `/health/ready` ([`health`]), Open311 GeoReport v2 under
//! `/open311/v2/` ([`open311`]), the admin API under `/admin/` and Prometheus metrics at
//! `/metrics` ([`admin`]), SIP over WebSocket for browsers at `/sip` ([`sip_ws`]), the embedded
//! JsSIP at `/console/assets/jssip.min.js` ([`vendor`]), reports from the call history
//! ([`reports`], admin), the public transparency page and open data ([`dashboard`]), the
//! operator console under `/console` ([`console`]), the supervisor's wallboard under
//! `/supervisor` ([`supervisor`], on the console's sessions); served by [`serve`] (header-read and idle
//! timeouts, a connection cap).
//!
//! Reads state through shared handles ([`crate::call::CallRegistry`], the ticket store, the menu
//! holder, UA counters, heartbeats); never touches sockets of the SIP or media layers (a
//! WebSocket it upgrades is handed to the SIP transport frame by frame).

pub(crate) mod admin;
pub(crate) mod announcements;
pub(crate) mod console;
pub(crate) mod dashboard;
pub(crate) mod health;
pub(crate) mod open311;
pub(crate) mod ratelimit;
pub(crate) mod reports;
pub(crate) mod serve;
pub(crate) mod sip_ws;
pub(crate) mod supervisor;
pub(crate) mod vendor;

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
pub(crate) struct ApiState {
    pub(crate) registry: Arc<CallRegistry>,
    pub(crate) ua: Arc<UaStats>,
    pub(crate) transport: Arc<TransportStats>,
    pub(crate) started: Instant,
    pub(crate) tickets: TicketStore,
    /// The menu new calls start on (Open311 services are derived from it).
    pub(crate) menu: Arc<MenuHolder>,
    pub(crate) open311: Arc<Open311Config>,
    pub(crate) admin: Arc<AdminConfig>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) ports: Arc<crate::media::ports::PortPool>,
    /// Operator queues (none when no agents are configured).
    pub(crate) queues: Option<crate::dispatch::queue::QueueHandle>,
    /// What `/health/ready` reads.
    pub(crate) ready: Arc<health::ReadyState>,
    /// Where callers' recordings are (`storage.recordings_dir`), for the admin API.
    pub(crate) recordings: std::path::PathBuf,
    /// Service-level targets and short abandons, for the reports and the dashboard.
    pub(crate) reports: Arc<crate::history::report::ReportsConfig>,
    /// The transparency page's figures, computed at most once a minute.
    pub(crate) open_data: Arc<dashboard::OpenDataCache>,
    /// `POST requests` allowance per Open311 API key.
    pub(crate) open311_posts: Arc<std::sync::Mutex<ratelimit::KeyLimiter>>,
    /// SIP over WebSocket at `/sip` (none: not served).
    pub(crate) sip_ws: Option<sip_ws::SipWebSocket>,
    /// The operator console's sessions and settings.
    pub(crate) console: Arc<console::Console>,
    /// The supervisor's wallboard: targets and the history figures it shows.
    pub(crate) supervisor: Arc<supervisor::Wallboard>,
    /// Supervisors joining operators' calls (listen, whisper, barge) at an API's request.
    pub(crate) monitors: crate::call::monitor::Monitors,
    /// The city's emergency announcements (`/admin/announcements`, Open311 `services`).
    pub(crate) announcements: Arc<crate::dispatch::announcements::Board>,
}

pub(crate) fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/health/ready", get(health::ready))
        .route("/sip", get(sip_ws::upgrade))
        .route("/console/assets/jssip.min.js", get(vendor::jssip))
        .nest("/open311/v2", open311::router())
        .merge(dashboard::router())
        .merge(admin::router(state.clone()))
        .merge(console::router(state.clone()))
        .merge(supervisor::router(state.clone()))
        .with_state(state)
}

/// Whether a secret someone gave (an admin token, an API key) is `expected`, compared as
/// SHA-256 digests in constant time: the time taken says nothing about how much of it, or
/// how much of its length, was right.
pub(crate) fn same_secret(given: &str, expected: &str) -> bool {
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
