//! The HTTP API (axum): health now; Open311, admin and metrics join it later.
//!
//! Reads state through shared handles ([`crate::call::CallRegistry`], UA counters); never
//! touches sockets of the SIP or media layers.

use crate::call::CallRegistry;
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
    /// Over finished calls: RTP packets from callers, to callers, and keys heard.
    pub rtp_packets_received: u64,
    pub rtp_packets_sent: u64,
    pub digits_received: u64,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health))
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
        rtp_packets_received: s.registry.rtp_in.load(Ordering::Relaxed),
        rtp_packets_sent: s.registry.rtp_out.load(Ordering::Relaxed),
        digits_received: s.registry.digits.load(Ordering::Relaxed),
    })
}
