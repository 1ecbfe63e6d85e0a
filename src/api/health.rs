//! `GET /health` (liveness) and `GET /health/ready` (readiness).
//!
//! * `/health` answers 200 whenever the process serves HTTP, with counters: restart the
//!   process only when this stops answering.
//! * `/health/ready` answers 200 `{"status": "ready"}` when the node can take calls, else 503
//!   `{"status": "not ready", "reasons": [...]}` naming each problem. A load balancer,
//!   Kamailio's dispatcher probe or systemd sends new calls elsewhere while it is 503. It is
//!   not ready when:
//!   - the ticket store cannot write (read-only, full, locked past its busy timeout, gone):
//!     a ticket-sized insert is tried and rolled back ([`TicketStore::probe_write`]);
//!   - a media clock thread has not turned for [`STALL_AFTER`] (every call on it is silent);
//!   - the SIP UA loop has not turned for [`STALL_AFTER`] (no INVITE would be answered);
//!   - the server is draining (stopping: new calls get 503);
//!   - the outbox is stuck: with forwarding or webhooks configured, its oldest undelivered
//!     row is older than `forward.stuck_after_seconds` (the CRM or a receiver has been
//!     failing that long; callers are still served, the city's other systems are behind).
//!
//! The checks run at most once per [`CHECK_EVERY`]; requests in between get the last answer,
//! so a flood of probes cannot load the database. Readiness needs no token (it says nothing
//! a caller could not learn by calling).
//!
//! The same answer reaches SIP: [`watch`] runs the checks every [`SIP_AVAILABILITY_EVERY`]
//! (at once when the drain starts) and sets [`UaStats::out_of_service`], and while it is set an
//! out-of-dialog OPTIONS (a SIP load balancer's probe: Kamailio's `dispatcher`,
//! OpenSIPS' `ds_ping`) is answered `503` with `Retry-After` instead of `200`, so the edge
//! takes the node out of its set before callers meet the problem. A stuck outbox is not one of
//! these: it is the city's other systems that are failing, every node sees the same, and
//! taking them all out would stop the line for a CRM outage. Reading the flag in the SIP loop
//! costs one atomic load; the checks themselves stay off that loop.
//!
//! [`UaStats::out_of_service`]: crate::sip::ua::UaStats::out_of_service
//!
//! [`TicketStore::probe_write`]: crate::dispatch::tickets::TicketStore::probe_write

use crate::api::ApiState;
use crate::heartbeat::Heartbeat;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A loop (media clock thread, SIP UA) that has not turned for this long is stalled. A media
/// thread turns every 4 ms with calls and every 200 ms without; the UA at least every 250 ms.
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(2);
/// The checks run at most this often; answers in between repeat the last result.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest the ticket-store write probe may take before it counts as failed.
pub(crate) const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(4);
/// How often [`watch`] refreshes the SIP side's availability from the checks: well inside the
/// probe interval of an edge proxy (the shipped Kamailio configuration probes every 2 s).
pub(crate) const SIP_AVAILABILITY_EVERY: Duration = Duration::from_secs(1);

/// `GET /health` body.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Health {
    pub(crate) status: String,
    pub(crate) version: String,
    pub(crate) live_calls: usize,
    pub(crate) dialogs: usize,
    pub(crate) uptime_seconds: u64,
    pub(crate) calls_completed: u64,
    pub(crate) calls_rejected: u64,
    pub(crate) sip_messages_received: u64,
    pub(crate) sip_messages_malformed: u64,
    /// Malformed requests not answered: their source was over the error-answer rate limit.
    pub(crate) sip_messages_malformed_unanswered: u64,
    /// Over finished calls: RTP packets from callers, to callers, and keys heard.
    pub(crate) rtp_packets_received: u64,
    pub(crate) rtp_packets_sent: u64,
    pub(crate) digits_received: u64,
    /// Our registration with the trunk (`trunks.register`), when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) trunk_registration: Option<crate::sip::trunk::RegistrationStatus>,
}

/// `GET /health/ready` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Readiness {
    /// `ready` or `not ready`.
    pub(crate) status: String,
    /// Why not, one line per problem (empty when ready).
    pub(crate) reasons: Vec<String>,
}

/// What the readiness check reads, and its last answer.
pub(crate) struct ReadyState {
    /// One per media clock thread.
    pub(crate) media: Vec<Arc<Heartbeat>>,
    /// Cancelled when the server starts to stop.
    pub(crate) draining: CancellationToken,
    last: tokio::sync::Mutex<Option<(Instant, Problems)>>,
    /// Whether the last check found the node ready (to log changes only).
    was_ready: AtomicBool,
    /// With an outbox: how old its oldest undelivered row may be.
    pub(crate) outbox_stuck_after: Option<Duration>,
}

impl ReadyState {
    pub(crate) fn new(media: Vec<Arc<Heartbeat>>, draining: CancellationToken) -> ReadyState {
        ReadyState {
            media,
            draining,
            last: tokio::sync::Mutex::new(None),
            was_ready: AtomicBool::new(true),
            outbox_stuck_after: None,
        }
    }

    /// Reports the outbox stuck when its oldest undelivered row is older than `after`.
    pub(crate) fn with_outbox(mut self, after: Option<Duration>) -> ReadyState {
        self.outbox_stuck_after = after;
        self
    }
}

/// The outbox problem, if its oldest undelivered row (created at `oldest_ms`) is older than
/// `after` at `now_ms` (sans-IO part).
pub(crate) fn outbox_problem(
    oldest_ms: Option<i64>,
    after: Duration,
    now_ms: i64,
) -> Option<String> {
    let age_ms = now_ms.saturating_sub(oldest_ms?);
    (u128::try_from(age_ms).unwrap_or(0) > after.as_millis()).then(|| {
        format!(
            "outbox stuck: its oldest undelivered item is {} s old (forward.stuck_after_seconds              is {}); see GET /admin/outbox",
            age_ms / 1000,
            after.as_secs()
        )
    })
}

/// The problems a check finds in the loops and the drain, at `now` (sans-IO part).
pub(crate) fn loop_problems(
    media: &[Arc<Heartbeat>],
    sip: &Heartbeat,
    draining: bool,
    now: Instant,
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, beat) in media.iter().enumerate() {
        let age = beat.age(now);
        if age >= STALL_AFTER {
            out.push(format!(
                "media clock stalled: thread {i} has not turned for {:.1} s",
                age.as_secs_f64()
            ));
        }
    }
    let age = sip.age(now);
    if age >= STALL_AFTER {
        out.push(format!(
            "SIP loop not answering: it has not turned for {:.1} s",
            age.as_secs_f64()
        ));
    }
    if draining {
        out.push("draining: the server is stopping and refuses new calls".to_string());
    }
    out
}

pub(crate) async fn health(State(s): State<ApiState>) -> Json<Health> {
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

/// The problems now: the last check's answer when it is younger than [`CHECK_EVERY`], else a
/// new check. Logs the changes between ready and not ready, and keeps the SIP side's
/// availability ([`UaStats::out_of_service`](crate::sip::ua::UaStats)) in step.
async fn reasons(s: &ApiState) -> Vec<String> {
    let problems = {
        let mut last = s.ready.last.lock().await;
        match &*last {
            Some((at, problems)) if at.elapsed() < CHECK_EVERY => problems.clone(),
            _ => {
                let problems = check(s).await;
                *last = Some((Instant::now(), problems.clone()));
                problems
            }
        }
    };
    s.ua.out_of_service
        .store(!problems.node.is_empty(), Ordering::Relaxed);
    let mut reasons = problems.node;
    reasons.extend(problems.elsewhere);
    let ready = reasons.is_empty();
    if s.ready.was_ready.swap(ready, Ordering::Relaxed) != ready {
        if ready {
            tracing::info!("ready again");
        } else {
            tracing::warn!(?reasons, "not ready");
        }
    }
    reasons
}

/// Keeps the SIP side's availability in step with readiness until `cancel`: a check every
/// [`SIP_AVAILABILITY_EVERY`], and one at once when the drain starts.
pub(crate) async fn watch(s: ApiState, cancel: CancellationToken) {
    let draining = s.ready.draining.clone();
    loop {
        reasons(&s).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = draining.cancelled(), if !draining.is_cancelled() => {
                // Forget the cached answer: the drain must show on the next OPTIONS.
                *s.ready.last.lock().await = None;
            }
            _ = tokio::time::sleep(SIP_AVAILABILITY_EVERY) => {}
        }
    }
}

pub(crate) async fn ready(State(s): State<ApiState>) -> Response {
    let reasons = reasons(&s).await;
    let ready = reasons.is_empty();
    let (code, status) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    };
    (
        code,
        Json(Readiness {
            status: status.into(),
            reasons,
        }),
    )
        .into_response()
}

/// What a check found.
#[derive(Debug, Clone, Default)]
struct Problems {
    /// This node cannot serve calls well: it should get none (OPTIONS answered 503).
    node: Vec<String>,
    /// Something beyond the node is failing (the outbox's receivers): readiness says so, the
    /// node still takes calls.
    elsewhere: Vec<String>,
}

async fn check(s: &ApiState) -> Problems {
    let mut reasons = Vec::new();
    let mut elsewhere = Vec::new();
    match tokio::time::timeout(STORE_PROBE_TIMEOUT, s.tickets.probe_write()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => reasons.push(format!("ticket store cannot write: {e}")),
        Err(_) => reasons.push(format!(
            "ticket store cannot write: no answer within {} s",
            STORE_PROBE_TIMEOUT.as_secs()
        )),
    }
    if let Some(after) = s.ready.outbox_stuck_after {
        match s.tickets.outbox_stats().await {
            Ok(st) => elsewhere.extend(outbox_problem(
                st.oldest_ms,
                after,
                crate::dispatch::outbox::epoch_ms(time::OffsetDateTime::now_utc()),
            )),
            Err(e) => reasons.push(format!("outbox unreadable: {e}")),
        }
    }
    // Read the loops after the probe, which may have waited on a lock.
    reasons.extend(loop_problems(
        &s.ready.media,
        &s.ua.heartbeat,
        s.ready.draining.is_cancelled(),
        Instant::now(),
    ));
    Problems {
        node: reasons,
        elsewhere,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_undelivered_item_is_a_stuck_outbox() {
        let after = Duration::from_secs(900);
        assert_eq!(outbox_problem(None, after, 5_000_000), None);
        assert_eq!(outbox_problem(Some(4_100_000), after, 5_000_000), None);
        let p = outbox_problem(Some(4_000_000), after, 5_000_000).unwrap();
        assert!(
            p.starts_with("outbox stuck: its oldest undelivered item is 1000 s old"),
            "{p}"
        );
    }

    #[test]
    fn stalled_loops_and_the_drain_are_named() {
        let t0 = Instant::now();
        let media = vec![Arc::new(Heartbeat::new(t0)), Arc::new(Heartbeat::new(t0))];
        let sip = Heartbeat::new(t0);
        let later = t0 + STALL_AFTER + Duration::from_millis(500);
        media[0].beat(later);
        sip.beat(later - Duration::from_millis(100));
        assert!(loop_problems(&media[..1], &sip, false, later).is_empty());
        let p = loop_problems(&media, &sip, false, later);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("media clock stalled: thread 1"), "{p:?}");
        let p = loop_problems(&media[..1], &sip, true, later + STALL_AFTER);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[1].starts_with("SIP loop not answering"), "{p:?}");
        assert!(p[2].starts_with("draining"), "{p:?}");
    }
}
