//! The HTTP API (axum): `/health`, Open311 GeoReport v2 under `/open311/v2/` ([`open311`]),
//! the admin API under `/admin/` and Prometheus metrics at `/metrics`.
//!
//! Reads state through shared handles ([`crate::call::CallRegistry`], the ticket store, the menu
//! holder, UA counters); never touches sockets of the SIP or media layers.

pub mod admin;
pub mod open311;

use crate::call::{CallRegistry, MenuHolder};
use crate::config::{AdminConfig, Open311Config};
use crate::dispatch::tickets::TicketStore;
use crate::sip::transport::TransportStats;
use crate::sip::ua::UaStats;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::sync::atomic::Ordering;
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
}

/// `GET /health` body.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub live_calls: usize,
    pub dialogs: usize,
    pub uptime_seconds: u64,
    pub calls_completed: u64,
    pub calls_rejected: u64,
    pub sip_messages_received: u64,
    pub sip_messages_malformed: u64,
    /// Malformed requests not answered: their source was over the error-answer rate limit.
    pub sip_messages_malformed_unanswered: u64,
    /// Over finished calls: RTP packets from callers, to callers, and keys heard.
    pub rtp_packets_received: u64,
    pub rtp_packets_sent: u64,
    pub digits_received: u64,
    /// Our registration with the trunk (`trunks.register`), when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trunk_registration: Option<crate::sip::trunk::RegistrationStatus>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health))
        .nest("/open311/v2", open311::router())
        .merge(admin::router())
        .with_state(state)
}

async fn health(State(s): State<ApiState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        live_calls: s.registry.len(),
        dialogs: s.ua.dialogs.load(Ordering::Relaxed),
        uptime_seconds: s.started.elapsed().as_secs(),
        calls_completed: s.registry.completed.load(Ordering::Relaxed),
        calls_rejected: s.registry.rejected.load(Ordering::Relaxed),
        sip_messages_received: s.transport.received.load(Ordering::Relaxed),
        sip_messages_malformed: s.transport.malformed.load(Ordering::Relaxed),
        sip_messages_malformed_unanswered: s.transport.malformed_unanswered.load(Ordering::Relaxed),
        rtp_packets_received: s.registry.rtp_in.load(Ordering::Relaxed),
        rtp_packets_sent: s.registry.rtp_out.load(Ordering::Relaxed),
        digits_received: s.registry.digits.load(Ordering::Relaxed),
        trunk_registration: s.ua.trunk_registration(),
    })
}
