//! Tickets leave the box: the outbox worker that delivers to the city's CRM (Open311
//! GeoReport v2, `forward.open311`) and to signed webhooks (`webhooks:`), and the poller that
//! brings the CRM's status, notes and expected dates back onto our tickets.
//!
//! The outbox itself (the table, written in the same transaction as each ticket) is
//! [`crate::dispatch::outbox`]; this module owns the sending: [`http`] (an HTTP/1.1 client),
//! [`georeport`] (the protocol, sans-IO), [`Backoff`] and [`sign`] (sans-IO), and the two
//! tasks [`spawn`] starts, each owned by the server's tracker and stopped by its token.
//!
//! # Delivery
//!
//! * Due rows are claimed (`in_flight`, the attempt counted) and sent one at a time, oldest
//!   first, as soon as they are written (the store rings a bell) or when a retry falls due.
//! * The CRM unreachable, slow (no answer within `forward.timeout_seconds`), answering 408,
//!   425, 429 or 5xx: tried again after [`Backoff`] (exponential, with jitter, capped at
//!   `forward.retry_max_seconds`), for as long as it takes.
//! * An answer we cannot read (not GeoReport, no number or token): tried again, and
//!   dead-lettered after `forward.garbage_attempts` such answers.
//! * Any other 4xx (a service code the CRM does not know, a wrong key): dead-lettered at once
//!   with the CRM's description, shown at `GET /admin/outbox`; `POST /admin/outbox/{id}/retry`
//!   sends it again once the mapping is fixed (the form is built at each attempt from the
//!   configuration then in force).
//! * Never two CRM requests for one ticket: one outbox row per ticket (a unique index), made
//!   `done` in the transaction that stores the CRM's number, and a row found `in_flight` at
//!   start (the server stopped mid-send) is dead-lettered for an admin to check rather than
//!   sent again. Each request also carries `Idempotency-Key: ivr311-<ticket>` for CRMs that
//!   honour it.
//!
//! # Status coming back
//!
//! Every `forward.poll_seconds` the poller asks the CRM for our open forwarded tickets by its
//! numbers (`GET requests.json?service_request_id=a,b,c`, a filter every GeoReport v2 server
//! has, 50 at a time), and takes status, notes and expected date where they changed; tokens
//! are resolved with `GET tokens/{token}.json` first.

pub(crate) mod georeport;
pub(crate) mod http;

use crate::dispatch::db;
use crate::dispatch::outbox::{
    epoch_ms, Event, Kind, OutboxItem, OutboxPlan, WebhookPlan, PERSONAL_FIELDS, TICKET_FIELDS,
};
use crate::dispatch::tickets::TicketStore;
use georeport::Verdict;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// `forward:` in the `--config` YAML.
///
/// ```yaml
/// forward:
///   open311:
///     url: "https://crm.example.gov/open311/v2"
///     api_key: "..."
///     jurisdiction_id: "city.example.gov"
///     service_map: {pothole: "4fd3b167e750846744000005"}
///   timeout_seconds: 10
///   retry_base_seconds: 2
///   retry_max_seconds: 900
///   garbage_attempts: 5
///   stuck_after_seconds: 900
///   poll_seconds: 300
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// The city's CRM. None (the default): tickets stay here (webhooks still go out).
    pub open311: Option<Open311Forward>,
    /// Longest a delivery (connect, TLS, request, whole answer) may take before it counts as
    /// failed and is retried. Default 10.
    pub timeout_seconds: u64,
    /// The first retry's delay; each next one doubles, with jitter (between half and all of
    /// it). Default 2.
    pub retry_base_seconds: u64,
    /// The longest delay between retries. Default 900 (15 minutes).
    pub retry_max_seconds: u64,
    /// Unreadable answers (2xx that is not GeoReport, or no number) before a row is
    /// dead-lettered. Default 5.
    pub garbage_attempts: u32,
    /// `/health/ready` reports the outbox stuck when its oldest undelivered row is older than
    /// this. Default 900.
    pub stuck_after_seconds: u64,
    /// How often the CRM is asked for the status of our open forwarded tickets. Default 300;
    /// 0: never.
    pub poll_seconds: u64,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            open311: None,
            timeout_seconds: 10,
            retry_base_seconds: 2,
            retry_max_seconds: 900,
            garbage_attempts: 5,
            stuck_after_seconds: 900,
            poll_seconds: 300,
        }
    }
}

/// `forward.open311`: the CRM's GeoReport v2 endpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Open311Forward {
    /// The endpoint's base URL (`.../open311/v2`), `http://` or `https://`; `requests.json`
    /// and `tokens/{token}.json` are appended.
    pub url: String,
    /// Our API key with the CRM (`api_key` on every `POST requests`).
    pub api_key: String,
    /// The CRM's `jurisdiction_id`, when it serves more than one. Default none.
    #[serde(default)]
    pub jurisdiction_id: Option<String>,
    /// Our service codes to the CRM's (`pothole: "4fd3..."`); a code not listed is sent as
    /// it is. Default empty.
    #[serde(default)]
    pub service_map: BTreeMap<String, String>,
}

/// One webhook (`webhooks:` is a list of these).
///
/// ```yaml
/// webhooks:
///   - url: "https://hooks.example.gov/311"
///     secret: "a long random string"
///     events: [request.created, request.updated, emergency.redirected, call.ended]
///     fields: [service_request_id, status, service_code, requested_datetime]
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where the JSON bodies are POSTed, `http://` or `https://`.
    pub url: String,
    /// The HMAC-SHA256 key of `X-311-Signature` (see [`sign`]).
    pub secret: String,
    /// Which events it gets; nothing else is sent to it.
    pub events: Vec<Event>,
    /// The ticket fields `request.*` events carry (the names of Open311's, plus `channel`,
    /// `language`, `external_id`, and the personal `phone`, `email`, `first_name`,
    /// `last_name`, `call_id`, `callback_requested`, `agent_id` only when listed). Default:
    /// [`DEFAULT_WEBHOOK_FIELDS`], the public Open311 fields.
    #[serde(default = "default_fields")]
    pub fields: Vec<String>,
}

/// The ticket fields a webhook gets when its `fields` is not given: what Open311 publishes.
pub const DEFAULT_WEBHOOK_FIELDS: &[&str] = &[
    "service_request_id",
    "status",
    "status_notes",
    "service_name",
    "service_code",
    "description",
    "agency_responsible",
    "service_notice",
    "requested_datetime",
    "updated_datetime",
    "expected_datetime",
    "address",
    "address_id",
    "zipcode",
    "lat",
    "long",
    "media_url",
    "external_id",
];

fn default_fields() -> Vec<String> {
    DEFAULT_WEBHOOK_FIELDS
        .iter()
        .map(|f| (*f).to_owned())
        .collect()
}

/// Why `forward:` or `webhooks:` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardConfigError {
    /// A URL is not `http(s)://host[:port]/...`.
    #[error("{what} {url:?} is not an http:// or https:// URL")]
    Url { what: &'static str, url: String },
    /// `fields` names something a ticket does not have.
    #[error("webhooks: {url:?}: unknown field {field:?} (known: {known})")]
    UnknownField {
        url: String,
        field: String,
        known: String,
    },
    /// A webhook with no events would never be sent anything.
    #[error("webhooks: {0:?}: events is empty")]
    NoEvents(String),
    /// An empty secret signs nothing.
    #[error("webhooks: {0:?}: secret is empty")]
    NoSecret(String),
    /// Two webhooks with one URL.
    #[error("webhooks: {0:?} is listed twice")]
    Duplicate(String),
}

impl ForwardConfig {
    /// Problems with `forward:` and `webhooks:`, for start-up.
    pub fn check(&self, webhooks: &[WebhookConfig]) -> Result<(), ForwardConfigError> {
        if let Some(o) = &self.open311 {
            if http::Target::parse(&o.url).is_err() {
                return Err(ForwardConfigError::Url {
                    what: "forward.open311.url",
                    url: o.url.clone(),
                });
            }
        }
        let mut seen = Vec::new();
        for w in webhooks {
            if http::Target::parse(&w.url).is_err() {
                return Err(ForwardConfigError::Url {
                    what: "webhooks: url",
                    url: w.url.clone(),
                });
            }
            if w.events.is_empty() {
                return Err(ForwardConfigError::NoEvents(w.url.clone()));
            }
            if w.secret.is_empty() {
                return Err(ForwardConfigError::NoSecret(w.url.clone()));
            }
            if let Some(f) = w
                .fields
                .iter()
                .find(|f| !TICKET_FIELDS.contains(&f.as_str()))
            {
                return Err(ForwardConfigError::UnknownField {
                    url: w.url.clone(),
                    field: f.clone(),
                    known: TICKET_FIELDS.join(", "),
                });
            }
            if seen.contains(&&w.url) {
                return Err(ForwardConfigError::Duplicate(w.url.clone()));
            }
            seen.push(&w.url);
        }
        Ok(())
    }

    /// Warnings for `ivr311 check --config` and start-up: personal fields on webhooks.
    pub(crate) fn warnings(webhooks: &[WebhookConfig]) -> Vec<String> {
        webhooks
            .iter()
            .filter_map(|w| {
                let personal: Vec<&str> = w
                    .fields
                    .iter()
                    .map(String::as_str)
                    .filter(|f| PERSONAL_FIELDS.contains(f))
                    .collect();
                (!personal.is_empty()).then(|| {
                    format!(
                        "webhooks: {:?} gets callers' personal data ({}): make sure the \
                         receiver may hold it",
                        w.url,
                        personal.join(", ")
                    )
                })
            })
            .collect()
    }

    /// What the ticket store writes to the outbox with each change.
    pub(crate) fn plan(&self, webhooks: &[WebhookConfig]) -> OutboxPlan {
        OutboxPlan {
            open311: self.open311.is_some(),
            webhooks: webhooks
                .iter()
                .map(|w| WebhookPlan {
                    url: w.url.clone(),
                    events: w.events.clone(),
                    fields: w.fields.clone(),
                })
                .collect(),
        }
    }
}

/// Retry delays: exponential from `base`, capped at `max`, with jitter. Sans-IO: the jitter
/// is given (a number in `[0, 1)`), so the schedule is testable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    /// The delay after failed attempt number `attempts` (1 for the first): between half and
    /// all of `min(max, base * 2^(attempts-1))`, as `jitter` goes from 0 to 1, so senders
    /// that failed together do not retry together.
    pub(crate) fn delay(&self, attempts: u32, jitter: f64) -> Duration {
        let exp = attempts.saturating_sub(1).min(32);
        let ceiling = self
            .base
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        ceiling / 2 + ceiling.mul_f64(jitter / 2.0)
    }
}

/// `X-311-Signature` for `body` sent at `timestamp` (Unix seconds):
/// `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn sign(secret: &str, timestamp: i64, body: &str) -> String {
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        unreachable!("HMAC takes a key of any length");
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(64);
    for b in digest {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
    }
    format!("t={timestamp},v1={hex}")
}

/// What the worker and the poller share.
struct Forwarder {
    store: TicketStore,
    client: http::Client,
    open311: Option<Open311Forward>,
    /// Webhook URL → secret.
    secrets: HashMap<String, String>,
    backoff: Backoff,
    garbage_attempts: u32,
    poll: Option<Duration>,
}

/// Rows claimed per pass.
const CLAIM_BATCH: u32 = 16;
/// Longest the worker sleeps without looking at the table (a retry due, a row another
/// process wrote).
const IDLE_LOOK: Duration = Duration::from_secs(1);
/// Tickets asked about per `GET requests`.
const POLL_BATCH: u32 = 50;

/// Starts the outbox worker and, with a CRM configured, the status poller, on `tracker`,
/// stopped by `cancel`. Rows a stopped server left `in_flight` are dealt with first
/// ([`TicketStore::outbox_recover`]). Nothing starts when nothing is configured.
pub(crate) fn spawn(
    store: TicketStore,
    cfg: &ForwardConfig,
    webhooks: &[WebhookConfig],
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    if cfg.open311.is_none() && webhooks.is_empty() {
        return;
    }
    let f = Arc::new(Forwarder {
        store,
        client: http::Client::new(Duration::from_secs(cfg.timeout_seconds.max(1))),
        open311: cfg.open311.clone(),
        secrets: webhooks
            .iter()
            .map(|w| (w.url.clone(), w.secret.clone()))
            .collect(),
        backoff: Backoff {
            base: Duration::from_secs(cfg.retry_base_seconds.max(1)),
            max: Duration::from_secs(cfg.retry_max_seconds.max(cfg.retry_base_seconds).max(1)),
        },
        garbage_attempts: cfg.garbage_attempts.max(1),
        poll: (cfg.poll_seconds > 0).then(|| Duration::from_secs(cfg.poll_seconds)),
    });
    tracker.spawn(lead(f, cancel));
}

/// Delivers and polls while this node holds the outbox's [`db::Leader`] lock (always, on SQLite),
/// and waits for it again when it is lost: with several nodes on PostgreSQL one of them
/// sends, so a row is never sent by two, and a node that dies hands the work to the next
/// within [`db::LEADER_CHECK`]. The new holder starts with [`TicketStore::outbox_recover`],
/// which then only finds rows the old one left mid-send.
async fn lead(f: Arc<Forwarder>, cancel: CancellationToken) {
    let pool = f.store.pool().clone();
    loop {
        let Some(mut leader) = db::Leader::acquire(&pool, db::locks::OUTBOX, &cancel).await else {
            return;
        };
        let turn = cancel.child_token();
        let work = TaskTracker::new();
        work.spawn(deliver_loop(f.clone(), turn.clone()));
        if f.open311.is_some() && f.poll.is_some() {
            work.spawn(poll_loop(f.clone(), turn.clone()));
        }
        work.close();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = leader.lost() => {
                tracing::warn!("outbox: lost the database connection that holds the outbox; \
                    stopping deliveries until it is taken again");
            }
        }
        turn.cancel();
        work.wait().await;
        if cancel.is_cancelled() {
            return;
        }
    }
}

async fn deliver_loop(f: Arc<Forwarder>, cancel: CancellationToken) {
    match f.store.outbox_recover().await {
        Ok((0, 0)) => {}
        Ok((resent, dead)) => tracing::warn!(
            webhooks_resent = resent,
            crm_requests_dead = dead,
            "outbox: deliveries interrupted by the last stop"
        ),
        Err(e) => tracing::error!(error = %e, "outbox: cannot recover interrupted deliveries"),
    }
    let wake = f.store.outbox_wake.clone();
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let now_ms = epoch_ms(OffsetDateTime::now_utc());
        let items = match f.store.outbox_claim(now_ms, CLAIM_BATCH).await {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(error = %e, "outbox: cannot read the queue");
                Vec::new()
            }
        };
        let busy = !items.is_empty();
        for item in items {
            // A started delivery finishes (within the timeout), so its outcome is recorded.
            deliver(&f, item).await;
        }
        if busy {
            continue;
        }
        let sleep = match f.store.outbox_next_due().await {
            Ok(Some(due)) => {
                let wait = due.saturating_sub(epoch_ms(OffsetDateTime::now_utc()));
                Duration::from_millis(u64::try_from(wait).unwrap_or(0)).min(IDLE_LOOK)
            }
            _ => IDLE_LOOK,
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Sends one claimed row and records what came of it.
async fn deliver(f: &Forwarder, item: OutboxItem) {
    let verdict = match item.kind {
        Kind::Open311 => send_crm(f, &item).await,
        Kind::Webhook => send_webhook(f, &item).await,
    };
    let now_ms = epoch_ms(OffsetDateTime::now_utc());
    let span = tracing::info_span!(
        "outbox",
        id = item.id,
        kind = ?item.kind,
        event = %item.event,
        service_request_id = item.ticket_id,
        attempt = item.attempts
    );
    let _enter = span.enter();
    let recorded = match verdict {
        Verdict::Delivered(ack) => {
            tracing::info!(?ack, "outbox: delivered");
            match (item.kind, item.ticket_id, ack) {
                (Kind::Open311, Some(ticket), Some(ack)) => {
                    f.store.outbox_crm_done(item.id, ticket, &ack, now_ms).await
                }
                _ => f.store.outbox_done(item.id, now_ms).await,
            }
        }
        Verdict::Refused(why) => {
            tracing::warn!(%why, "outbox: refused, dead-lettered");
            f.store.outbox_dead(item.id, &why).await
        }
        Verdict::Garbage(why) if item.attempts >= f.garbage_attempts => {
            tracing::warn!(%why, "outbox: unreadable answers, dead-lettered");
            f.store.outbox_dead(item.id, &why).await
        }
        Verdict::Garbage(why) | Verdict::Retry(why) => {
            let delay = f.backoff.delay(item.attempts, rand::random::<f64>());
            let next = now_ms.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
            tracing::info!(%why, retry_in_ms = delay.as_millis() as u64, "outbox: will retry");
            f.store.outbox_retry_at(item.id, next, &why).await
        }
    };
    if let Err(e) = recorded {
        // The row stays in_flight; the next start deals with it.
        tracing::error!(error = %e, "outbox: cannot record a delivery's outcome");
    }
}

async fn send_crm(f: &Forwarder, item: &OutboxItem) -> Verdict {
    let Some(crm) = &f.open311 else {
        return Verdict::Retry("forward.open311 is not configured now".into());
    };
    let Some(ticket_id) = item.ticket_id else {
        return Verdict::Refused("no ticket on this row".into());
    };
    let ticket = match f.store.get(ticket_id).await {
        Ok(Some(t)) => t,
        Ok(None) => return Verdict::Refused(format!("ticket {ticket_id} no longer exists")),
        Err(e) => return Verdict::Retry(format!("ticket store: {e}")),
    };
    let form = georeport::post_form(
        &ticket,
        &crm.api_key,
        crm.jurisdiction_id.as_deref(),
        &crm.service_map,
    );
    let url = format!("{}/requests.json", crm.url.trim_end_matches('/'));
    let headers = [("idempotency-key", format!("ivr311-{ticket_id}"))];
    match f
        .client
        .send(
            axum::http::Method::POST,
            &url,
            &headers,
            Some(("application/x-www-form-urlencoded", form.into_bytes())),
        )
        .await
    {
        Ok(a) => georeport::crm_verdict(a.status, &a.body),
        Err(e) => Verdict::Retry(e.to_string()),
    }
}

async fn send_webhook(f: &Forwarder, item: &OutboxItem) -> Verdict {
    let (Some(url), Some(body)) = (&item.target, &item.body) else {
        return Verdict::Refused("webhook row without a URL or body".into());
    };
    let Some(secret) = f.secrets.get(url) else {
        // The webhook was removed from the config: nothing is sent where it is not asked for.
        return Verdict::Refused(format!("webhook {url} is no longer configured"));
    };
    let t = OffsetDateTime::now_utc().unix_timestamp();
    let delivery = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str().map(str::to_owned)))
        .unwrap_or_default();
    let headers = [
        ("x-311-signature", sign(secret, t, body)),
        ("x-311-event", item.event.as_str().to_owned()),
        ("x-311-delivery", delivery),
    ];
    match f
        .client
        .send(
            axum::http::Method::POST,
            url,
            &headers,
            Some(("application/json", body.clone().into_bytes())),
        )
        .await
    {
        Ok(a) => georeport::webhook_verdict(a.status, &a.body),
        Err(e) => Verdict::Retry(e.to_string()),
    }
}

async fn poll_loop(f: Arc<Forwarder>, cancel: CancellationToken) {
    let Some(every) = f.poll else { return };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        poll_once(&f, &cancel).await;
    }
}

/// Resolves tokens, then asks the CRM about every open forwarded ticket.
async fn poll_once(f: &Forwarder, cancel: &CancellationToken) {
    let Some(crm) = &f.open311 else { return };
    let base = crm.url.trim_end_matches('/');
    // `jurisdiction_id=...` when configured, else nothing.
    let jurisdiction = crm.jurisdiction_id.as_deref().map_or(String::new(), |j| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("jurisdiction_id", j)
            .finish()
    });
    if let Ok(tokens) = f.store.crm_tokens(POLL_BATCH).await {
        for (ticket, token) in tokens {
            let token_path = form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>();
            let url = if jurisdiction.is_empty() {
                format!("{base}/tokens/{token_path}.json")
            } else {
                format!("{base}/tokens/{token_path}.json?{jurisdiction}")
            };
            if let Ok(a) = f
                .client
                .send(axum::http::Method::GET, &url, &[], None)
                .await
            {
                if let Some(id) = (a.status == 200)
                    .then(|| georeport::parse_token(&a.body))
                    .flatten()
                {
                    if let Err(e) = f.store.crm_resolved(ticket, &id).await {
                        tracing::warn!(error = %e, "outbox: cannot store a resolved token");
                    }
                }
            }
        }
    }
    let mut after = 0;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let batch = match f.store.crm_open(after, POLL_BATCH).await {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "outbox: cannot list forwarded tickets");
                return;
            }
        };
        after = batch.last().map_or(after, |t| t.service_request_id);
        let ids: Vec<&str> = batch
            .iter()
            .filter_map(|t| t.external_id.as_deref())
            .collect();
        let url = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("service_request_id", &ids.join(","));
            if let Some(j) = &crm.jurisdiction_id {
                query.append_pair("jurisdiction_id", j);
            }
            format!("{base}/requests.json?{}", query.finish())
        };
        let answer = match f
            .client
            .send(axum::http::Method::GET, &url, &[], None)
            .await
        {
            Ok(a) if a.status == 200 => a,
            Ok(a) => {
                tracing::warn!(status = a.status, "outbox: CRM status poll refused");
                return;
            }
            Err(e) => {
                tracing::info!(error = %e, "outbox: CRM status poll failed");
                return;
            }
        };
        let Some(listed) = georeport::parse_requests(&answer.body) else {
            tracing::warn!("outbox: CRM status poll answer is not GeoReport");
            return;
        };
        for r in listed {
            let Some(ours) = batch
                .iter()
                .find(|t| t.external_id.as_deref() == Some(r.id.as_str()))
            else {
                continue;
            };
            let changed = f
                .store
                .crm_update(
                    ours.service_request_id,
                    r.status,
                    r.status_notes.as_deref(),
                    r.expected.as_deref(),
                    OffsetDateTime::now_utc(),
                )
                .await;
            if let Err(e) = changed {
                tracing::warn!(error = %e, "outbox: cannot take the CRM's status");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let b = Backoff {
            base: Duration::from_secs(2),
            max: Duration::from_secs(60),
        };
        assert_eq!(b.delay(1, 0.0), Duration::from_secs(1));
        assert_eq!(b.delay(1, 0.999_999).as_millis(), 1999);
        assert_eq!(b.delay(2, 0.0), Duration::from_secs(2));
        assert_eq!(b.delay(3, 1.0), Duration::from_secs(8));
        assert_eq!(b.delay(5, 1.0), Duration::from_secs(32));
        // Capped: 2 * 2^5 = 64 > 60.
        assert_eq!(b.delay(6, 1.0), Duration::from_secs(60));
        assert_eq!(b.delay(6, 0.0), Duration::from_secs(30));
        assert_eq!(b.delay(u32::MAX, 1.0), Duration::from_secs(60));
        assert_eq!(b.delay(0, 1.0), Duration::from_secs(2));
        assert_eq!(b.delay(3, f64::NAN), Duration::from_secs(4));
        // Jitter spreads senders that failed together.
        let spread: std::collections::HashSet<u128> = (0..10)
            .map(|i| b.delay(4, f64::from(i) / 10.0).as_millis())
            .collect();
        assert_eq!(spread.len(), 10);
    }

    /// The documented recipe: HMAC-SHA256 over "{t}.{body}" with the secret, hex.
    #[test]
    fn signature_matches_the_recipe() {
        // Reference computed independently: printf '1700000000.{"a":1}' |
        //   openssl dgst -sha256 -hmac whsec
        let sig = sign("whsec", 1_700_000_000, r#"{"a":1}"#);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"whsec").unwrap();
        mac.update(br#"1700000000.{"a":1}"#);
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sig, format!("t=1700000000,v1={want}"));
        assert_ne!(sign("other", 1_700_000_000, r#"{"a":1}"#), sig);
        assert_ne!(sign("whsec", 1_700_000_001, r#"{"a":1}"#), sig);
    }

    #[test]
    fn config_is_checked() {
        let yaml = r#"
open311:
  url: "http://127.0.0.1:9/open311/v2"
  api_key: k
  service_map: {pothole: "4fd3"}
"#;
        let cfg: ForwardConfig = serde_yaml::from_str(yaml).unwrap();
        let hooks: Vec<WebhookConfig> = serde_yaml::from_str(
            r#"[{url: "https://h.example/x", secret: s, events: [request.created]}]"#,
        )
        .unwrap();
        assert_eq!(hooks[0].fields, default_fields());
        cfg.check(&hooks).unwrap();
        assert!(ForwardConfig::warnings(&hooks).is_empty());
        let plan = cfg.plan(&hooks);
        assert!(plan.open311 && plan.wants(Event::RequestCreated));
        assert!(!plan.wants(Event::CallEnded));
        let bad: Vec<WebhookConfig> = serde_yaml::from_str(
            r#"[{url: "https://h.example/x", secret: s, events: [request.created], fields: [recording]}]"#,
        )
        .unwrap();
        assert!(matches!(
            cfg.check(&bad),
            Err(ForwardConfigError::UnknownField { .. })
        ));
        let personal: Vec<WebhookConfig> = serde_yaml::from_str(
            r#"[{url: "https://h.example/x", secret: s, events: [request.created], fields: [phone]}]"#,
        )
        .unwrap();
        assert_eq!(ForwardConfig::warnings(&personal).len(), 1);
        assert!(serde_yaml::from_str::<Vec<WebhookConfig>>(
            r#"[{url: "https://h.example/x", secret: s, events: [request.deleted]}]"#
        )
        .is_err());
        assert!(
            serde_yaml::from_str::<ForwardConfig>("open311: {url: x, api_key: k, typo: 1}")
                .is_err()
        );
    }
}
