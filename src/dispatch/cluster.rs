//! Operators and waiting callers shared by the nodes of one PostgreSQL store.
//!
//! With several nodes behind the SIP edge, each caller's media stays on the node that
//! answered the call, and each operator's phone registers with one node (the edge hashes the
//! address of record). This module makes the operators one team and the queues one line:
//!
//! - **Registrations.** Every node writes the operators' phones it registered into
//!   `cluster_agents` (contact, the flow the REGISTER came over, and the binding's expiry) and
//!   reads the others'. An operator registered on another node is logged in here too and is
//!   rung along the same flow: through the edge, which relays what nodes send to the request
//!   URI (README "Running more than one node"). A row outlives its node: a phone registered
//!   with a node that died stays reachable until its binding expires or it registers again
//!   (with the next node). Only UDP flows are shared; a TCP or WebSocket flow is one node's
//!   connection, so phones and browsers on those are offered calls by their own node only.
//! - **Claims.** Before a node rings an operator it claims them in `cluster_claims`, in a
//!   transaction under one advisory lock ([`super::db::locks::CLAIMS`]). A node keeps its
//!   claim while the operator is busy there (ringing, talking, wrapping up, in a no-answer
//!   pause, paused or signed off at the console) and renews its lease every [`TICK`]; other
//!   nodes do not offer a claimed operator. A node that dies stops renewing, and its claims
//!   end with their [`LEASE`]: nobody is held longer than that by a dead node.
//! - **One line.** Every [`TICK`] a node replaces its rows in `cluster_waiting` with the
//!   callers it has waiting (not those whose operator's phone rings, not call-backs still
//!   parked). A claim is refused while another node has a caller the operator could take who
//!   is ahead (higher priority, or the same and earlier arrival, by the nodes' clocks): that
//!   node takes the operator at its next pass, within about one [`TICK`]. So callers are
//!   served in arrival order across nodes within a second or so. A node defers to one such
//!   caller for at most [`DEFER_LIMIT`] (the other node may not see the operator free, e.g.
//!   in its own no-answer pause): after that it offers to its own caller, so no line stalls.
//!   The waiting callers of a node that dies go with its media; their rows expire with the
//!   lease, and their tickets and call-back requests are in the store already.
//!
//! If the store cannot be reached, a claim is answered [`ClaimReply::Unavailable`] and the
//! node rings as a single node would: an operator might then be offered two calls at once by
//! two nodes, which is better than callers waiting for an operator who is free. Claims held
//! before the outage stay with their node while it lives (its leases are renewed once the
//! store is back; if it stays away past [`LEASE`], another node may take the operator).
//!
//! Why not Kamailio's registrar with its location table in PostgreSQL: the operators'
//! credentials, lockouts and the console's sign-off live in ivr311's registrar and queue;
//! sharing what they decided keeps one place for each, and keeps the edge stateless.
//!
//! A single node on SQLite never starts this; its tables stay empty.

use crate::dispatch::db;
use crate::dispatch::queue::{CallerId, LineEntry, QueueHandle, Takes};
use crate::sip::transport::{Flow, Transport};
use dashmap::DashMap;
use sqlx::AnyPool;
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long a node's claims and line rows last without renewal.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a node renews its leases and reads the others' claims, line and phones.
pub const TICK: Duration = Duration::from_millis(500);
/// The longest a node defers to one earlier caller of another node for one operator.
pub const DEFER_LIMIT: Duration = Duration::from_secs(3);
/// How long an operator is not offered here after a refused claim (the other node's turn).
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Commands waiting for the cluster task.
const COMMANDS: usize = 1024;
/// The longest the cluster task waits on the store for one step. A claim is on the path of a
/// caller waiting for an operator: a store that does not answer within this is treated as
/// unreachable, and claims are answered [`ClaimReply::Unavailable`] at once until a
/// [`TICK`] reaches it again.
const STORE_WAIT: Duration = Duration::from_secs(1);

/// `step` on the store, given at most [`STORE_WAIT`].
async fn within<T>(
    step: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(STORE_WAIT, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {STORE_WAIT:?}")),
    }
}

/// What the queue dispatcher asks of the cluster.
#[derive(Debug)]
pub(crate) enum ClusterCmd {
    /// May `agent` ring for `caller` (waiting as `entry`, arrived at `arrived_ms`)? The answer
    /// comes back as [`QueueHandle::claimed`].
    Claim {
        caller: CallerId,
        agent: String,
        entry: LineEntry,
        arrived_ms: i64,
        takes: Takes,
    },
    /// Keep `agent` held: it is busy on this node.
    Hold(String),
    /// `agent` is free (or logged out) on this node.
    Release(String),
}

/// The cluster's answer to a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimReply {
    /// Ring the operator: this node holds them.
    Granted,
    /// The store cannot be reached: ring as a single node would.
    Unavailable,
    /// Another node holds the operator or has an earlier caller for them: try the operator
    /// again after `retry_after`.
    Refused { retry_after: Duration },
}

/// What the store said about a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Granted,
    /// Another node holds the operator.
    Held {
        node: String,
    },
    /// Another node has a caller ahead whom the operator could take.
    Earlier {
        node: String,
        caller: i64,
    },
}

/// An operator's phone registered with another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteAgent {
    pub agent: String,
    pub node: String,
    pub contact: String,
    pub flow: Flow,
}

/// One registration this node shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub agent: String,
    pub contact: String,
    pub flow: Flow,
    pub expires_ms: i64,
}

/// The cluster tables of one store, as node `node` sees them.
#[derive(Debug, Clone)]
pub struct ClusterStore {
    pool: AnyPool,
    node: String,
}

/// How a shared flow is written: `udp:ADDR:PORT`. `None` for flows other nodes cannot use.
fn flow_text(flow: &Flow) -> Option<String> {
    (flow.transport == Transport::Udp).then(|| format!("udp:{}", flow.remote))
}

fn parse_flow(s: &str) -> Option<Flow> {
    let remote: SocketAddr = s.strip_prefix("udp:")?.parse().ok()?;
    Some(Flow {
        transport: Transport::Udp,
        remote,
        conn: 0,
    })
}

impl ClusterStore {
    pub fn new(pool: AnyPool, node: impl Into<String>) -> Self {
        ClusterStore {
            pool,
            node: node.into(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Claims `agent` for this node's caller of `priority` who arrived at `arrived_ms`,
    /// unless another node holds the agent (with a lease running at `now_ms`) or has a caller
    /// ahead that `could_take` says the agent could take (those for which `skip` is true
    /// excepted). Granted, the lease runs to `now_ms + LEASE`.
    pub async fn claim(
        &self,
        now_ms: i64,
        agent: &str,
        priority: i32,
        arrived_ms: i64,
        could_take: impl Fn(&str, Option<&str>) -> bool,
        skip: impl Fn(&str, i64) -> bool,
    ) -> Result<Claim, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        db::lock_xact(&mut tx, db::locks::CLAIMS).await?;
        let ahead = sqlx::query(&db::sql(
            &*tx,
            "SELECT node, caller, queue, skill FROM cluster_waiting \
             WHERE node <> ? AND lease_ms > ? \
             AND (priority > ? OR (priority = ? AND arrived_ms < ?)) \
             ORDER BY priority DESC, arrived_ms, node, caller",
        ))
        .bind(&self.node)
        .bind(now_ms)
        .bind(i64::from(priority))
        .bind(i64::from(priority))
        .bind(arrived_ms)
        .fetch_all(&mut *tx)
        .await?;
        for row in &ahead {
            let node: String = row.try_get("node")?;
            let caller: i64 = row.try_get("caller")?;
            let queue: String = row.try_get("queue")?;
            let skill: Option<String> = row.try_get("skill")?;
            if could_take(&queue, skill.as_deref()) && !skip(&node, caller) {
                return Ok(Claim::Earlier { node, caller });
            }
        }
        if let Some(node) = self.other_holder(&mut tx, agent, now_ms).await? {
            return Ok(Claim::Held { node });
        }
        Self::put_claim(&mut tx, agent, &self.node, now_ms).await?;
        tx.commit().await?;
        Ok(Claim::Granted)
    }

    /// The other node whose hold on `agent` runs at `now_ms`, if any.
    async fn other_holder(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        agent: &str,
        now_ms: i64,
    ) -> Result<Option<String>, sqlx::Error> {
        let holder: Option<(String, i64)> = sqlx::query_as(&db::sql(
            &**tx,
            "SELECT node, lease_ms FROM cluster_claims WHERE agent_id = ?",
        ))
        .bind(agent)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(holder.and_then(|(node, lease)| (node != self.node && lease > now_ms).then_some(node)))
    }

    async fn put_claim(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        agent: &str,
        node: &str,
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&db::sql(
            &**tx,
            "INSERT INTO cluster_claims (agent_id, node, lease_ms) VALUES (?, ?, ?) \
             ON CONFLICT (agent_id) DO UPDATE SET node = excluded.node, \
             lease_ms = excluded.lease_ms",
        ))
        .bind(agent)
        .bind(node)
        .bind(now_ms + lease_ms())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Holds `agent` for this node unless another node's hold on it runs at `now_ms`
    /// (`false` then). No line check: the agent is already busy here.
    pub async fn hold(&self, now_ms: i64, agent: &str) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        db::lock_xact(&mut tx, db::locks::CLAIMS).await?;
        if self.other_holder(&mut tx, agent, now_ms).await?.is_some() {
            return Ok(false);
        }
        Self::put_claim(&mut tx, agent, &self.node, now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Lets `agent` go, if this node holds it.
    pub async fn release(&self, agent: &str) -> Result<(), sqlx::Error> {
        self.delete_mine("cluster_claims", agent).await
    }

    /// Deletes this node's row of `agent` in `table` (one of the cluster tables).
    async fn delete_mine(&self, table: &'static str, agent: &str) -> Result<(), sqlx::Error> {
        let sql = format!("DELETE FROM {table} WHERE agent_id = ? AND node = ?");
        sqlx::query(&db::sql(&self.pool, &sql))
            .bind(agent)
            .bind(&self.node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Renews this node's claims to `now_ms + LEASE`, and returns the agents other nodes
    /// hold at `now_ms`.
    pub async fn renew(&self, now_ms: i64) -> Result<HashSet<String>, sqlx::Error> {
        sqlx::query(&db::sql(
            &self.pool,
            "UPDATE cluster_claims SET lease_ms = ? WHERE node = ?",
        ))
        .bind(now_ms + lease_ms())
        .bind(&self.node)
        .execute(&self.pool)
        .await?;
        let held: Vec<String> = sqlx::query_scalar(&db::sql(
            &self.pool,
            "SELECT agent_id FROM cluster_claims WHERE node <> ? AND lease_ms > ?",
        ))
        .bind(&self.node)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(held.into_iter().collect())
    }

    /// Replaces this node's line with `line` (entries and their arrival, epoch ms), leased
    /// to `now_ms + LEASE`.
    pub async fn publish_line(
        &self,
        now_ms: i64,
        line: &[(LineEntry, i64)],
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&db::sql(&*tx, "DELETE FROM cluster_waiting WHERE node = ?"))
            .bind(&self.node)
            .execute(&mut *tx)
            .await?;
        let insert = db::sql(
            &*tx,
            "INSERT INTO cluster_waiting \
             (node, caller, queue, skill, priority, arrived_ms, lease_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        );
        for (e, arrived_ms) in line {
            sqlx::query(&insert)
                .bind(&self.node)
                .bind(e.caller as i64)
                .bind(&e.queue)
                .bind(e.skill.clone())
                .bind(i64::from(e.priority))
                .bind(*arrived_ms)
                .bind(now_ms + lease_ms())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// Removes this node's claims and line (a clean stop: its callers and calls are gone).
    pub async fn leave(&self) -> Result<(), sqlx::Error> {
        for table in ["cluster_claims", "cluster_waiting"] {
            sqlx::query(&db::sql(
                &self.pool,
                &format!("DELETE FROM {table} WHERE node = ?"),
            ))
            .bind(&self.node)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Shares a registration taken by this node (`false`: not shareable, see the module
    /// docs).
    pub async fn register(&self, r: &Registration) -> Result<bool, sqlx::Error> {
        let Some(flow) = flow_text(&r.flow) else {
            return Ok(false);
        };
        sqlx::query(&db::sql(
            &self.pool,
            "INSERT INTO cluster_agents (agent_id, node, contact, flow, expires_ms) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (agent_id) DO UPDATE SET \
             node = excluded.node, contact = excluded.contact, flow = excluded.flow, \
             expires_ms = excluded.expires_ms",
        ))
        .bind(&r.agent)
        .bind(&self.node)
        .bind(&r.contact)
        .bind(flow)
        .bind(r.expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(true)
    }

    /// Withdraws this node's registration of `agent` (the phone unregistered or its binding
    /// expired here). Another node's newer registration of the same phone stays.
    pub async fn unregister(&self, agent: &str) -> Result<(), sqlx::Error> {
        self.delete_mine("cluster_agents", agent).await
    }

    /// The phones other nodes registered that have not expired at `now_ms`.
    pub async fn remote_agents(&self, now_ms: i64) -> Result<Vec<RemoteAgent>, sqlx::Error> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(&db::sql(
            &self.pool,
            "SELECT agent_id, node, contact, flow FROM cluster_agents \
             WHERE node <> ? AND expires_ms > ? ORDER BY agent_id",
        ))
        .bind(&self.node)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(agent, node, contact, flow)| {
                Some(RemoteAgent {
                    flow: parse_flow(&flow)?,
                    agent,
                    node,
                    contact,
                })
            })
            .collect())
    }
}

fn lease_ms() -> i64 {
    LEASE.as_millis() as i64
}

/// What the cluster task works with.
pub(crate) struct ClusterDeps {
    pub(crate) store: ClusterStore,
    pub(crate) queue: QueueHandle,
    /// The UA's agent → (contact, flow) map the calls ring operators by; operators of other
    /// nodes are added to it here.
    pub(crate) contacts: Arc<DashMap<String, (String, Flow)>>,
    /// The expiry of each operator registered with this node (kept by the UA).
    pub(crate) expiries: Arc<DashMap<String, Instant>>,
    /// `ivr311_cluster_claims_total{outcome}` goes here.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

/// Counts a claim's outcome: `granted`, `held` (another node has the operator), `earlier`
/// (another node has an earlier caller for them) or `unavailable` (no store: rung anyway).
fn count_claim(metrics: &crate::metrics::Metrics, outcome: &str) {
    metrics.add(
        "ivr311_cluster_claims_total",
        "Claims on an operator before ringing them, by outcome (nodes sharing a store).",
        &[("outcome", outcome)],
        1,
    );
}

/// Starts the cluster task: claims for the queue, leases, the shared line and phones.
pub(crate) fn spawn(deps: ClusterDeps, tracker: &TaskTracker, cancel: CancellationToken) {
    tracker.spawn(run(deps, cancel));
}

struct Task {
    deps: ClusterDeps,
    /// Agents the queue wants held, and those this node holds in the store.
    wanted: HashSet<String>,
    got: HashSet<String>,
    /// When this node first deferred to another node's caller for an agent.
    deferred: HashMap<(String, String, i64), Instant>,
    /// Registrations this node shares: agent → (contact, flow, expires_ms).
    shared: HashMap<String, (String, Flow, i64)>,
    /// Operators of other nodes logged in here: agent → (contact, flow).
    remote: HashMap<String, (String, Flow)>,
    /// Whether the last pass reached the store (for logging changes only).
    reachable: bool,
}

async fn run(deps: ClusterDeps, cancel: CancellationToken) {
    let (tx, mut rx) = mpsc::channel(COMMANDS);
    deps.queue.join_cluster(tx).await;
    info!(node = %deps.store.node(), "operators and queues shared with the other nodes");
    let mut task = Task {
        deps,
        wanted: HashSet::new(),
        got: HashSet::new(),
        deferred: HashMap::new(),
        shared: HashMap::new(),
        remote: HashMap::new(),
        reachable: true,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            cmd = rx.recv() => match cmd {
                Some(cmd) => task.command(cmd).await,
                None => break,
            },
            _ = tick.tick() => task.pass().await,
        }
    }
    if let Err(e) = task.deps.store.leave().await {
        debug!(error = %e, "could not clear this node's claims and line at stop");
    }
}

impl Task {
    fn reached<T>(&mut self, what: &str, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => {
                if !self.reachable {
                    info!("cluster store reachable again");
                    self.reachable = true;
                }
                Some(v)
            }
            Err(e) => {
                if self.reachable {
                    warn!(error = %e, what, "cluster store unreachable; operators offered by this node alone");
                    self.reachable = false;
                }
                None
            }
        }
    }

    async fn command(&mut self, cmd: ClusterCmd) {
        let now_ms = crate::history::epoch_ms_now();
        match cmd {
            ClusterCmd::Claim {
                caller,
                agent,
                entry,
                arrived_ms,
                takes,
            } => {
                if !self.reachable {
                    // Rings as one node would; the next pass finds out whether the store is back.
                    count_claim(&self.deps.metrics, "unavailable");
                    let reply = ClaimReply::Unavailable;
                    self.deps.queue.claimed(caller, agent, reply).await;
                    return;
                }
                let deferred = &self.deferred;
                let skip = |node: &str, other: i64| {
                    deferred
                        .get(&(agent.clone(), node.to_owned(), other))
                        .is_some_and(|t| t.elapsed() >= DEFER_LIMIT)
                };
                let r = within(self.deps.store.claim(
                    now_ms,
                    &agent,
                    entry.priority,
                    arrived_ms,
                    |q, s| takes.could_take(q, s),
                    skip,
                ))
                .await;
                let outcome = match &r {
                    Ok(Claim::Granted) => "granted",
                    Ok(Claim::Held { .. }) => "held",
                    Ok(Claim::Earlier { .. }) => "earlier",
                    Err(_) => "unavailable",
                };
                count_claim(&self.deps.metrics, outcome);
                let reply = match self.reached("claim", r) {
                    Some(Claim::Granted) => {
                        self.wanted.insert(agent.clone());
                        self.got.insert(agent.clone());
                        ClaimReply::Granted
                    }
                    Some(Claim::Held { node }) => {
                        debug!(%agent, %node, "operator held by another node");
                        ClaimReply::Refused {
                            retry_after: RETRY_AFTER,
                        }
                    }
                    Some(Claim::Earlier {
                        node,
                        caller: other,
                    }) => {
                        debug!(%agent, %node, other, "another node has an earlier caller");
                        self.deferred
                            .entry((agent.clone(), node, other))
                            .or_insert_with(Instant::now);
                        ClaimReply::Refused {
                            retry_after: RETRY_AFTER,
                        }
                    }
                    None => ClaimReply::Unavailable,
                };
                self.deps.queue.claimed(caller, agent, reply).await;
            }
            ClusterCmd::Hold(agent) => {
                self.wanted.insert(agent.clone());
                if !self.reachable {
                    return;
                }
                let r = within(self.deps.store.hold(now_ms, &agent)).await;
                if self.reached("hold", r) == Some(true) {
                    self.got.insert(agent);
                }
            }
            ClusterCmd::Release(agent) => {
                self.wanted.remove(&agent);
                // Away, the next pass that reaches the store lets it go.
                if self.reachable && self.got.contains(&agent) {
                    let r = within(self.deps.store.release(&agent)).await;
                    if self.reached("release", r).is_some() {
                        self.got.remove(&agent);
                    }
                }
            }
        }
    }

    /// One [`TICK`]: leases, the others' holds, the line, the phones.
    async fn pass(&mut self) {
        let now_ms = crate::history::epoch_ms_now();
        let r = within(self.deps.store.renew(now_ms)).await;
        let Some(held) = self.reached("renew", r) else {
            // Nothing else this pass: claims are answered at once meanwhile.
            return;
        };
        self.deps.queue.held_elsewhere(held).await;
        // Releases that could not be made while the store was away.
        let stale: Vec<String> = self.got.difference(&self.wanted).cloned().collect();
        for agent in stale {
            if self
                .reached("release", within(self.deps.store.release(&agent)).await)
                .is_some()
            {
                self.got.remove(&agent);
            }
        }
        // Holds asked for while another node still had the agent.
        let missing: Vec<String> = self.wanted.difference(&self.got).cloned().collect();
        for agent in missing {
            let r = within(self.deps.store.hold(now_ms, &agent)).await;
            if self.reached("hold", r) == Some(true) {
                self.got.insert(agent);
            }
        }
        let line = self.deps.queue.line().await;
        let r = within(self.deps.store.publish_line(now_ms, &line)).await;
        self.reached("line", r);
        self.deferred
            .retain(|_, t| t.elapsed() < DEFER_LIMIT + Duration::from_secs(60));
        self.share_registrations().await;
        self.log_in_remote(now_ms).await;
    }

    /// Shares the phones registered here, withdraws those gone.
    async fn share_registrations(&mut self) {
        let mut local: HashMap<String, (String, Flow, i64)> = HashMap::new();
        for e in self.deps.expiries.iter() {
            let agent = e.key();
            let Some(c) = self.deps.contacts.get(agent) else {
                continue;
            };
            let (contact, flow) = c.value().clone();
            local.insert(
                agent.clone(),
                (contact, flow, crate::history::wall_ms(*e.value())),
            );
        }
        let gone: Vec<String> = self
            .shared
            .keys()
            .filter(|a| !local.contains_key(*a))
            .cloned()
            .collect();
        for agent in gone {
            let r = within(self.deps.store.unregister(&agent)).await;
            if self.reached("unregister", r).is_some() {
                self.shared.remove(&agent);
            }
        }
        for (agent, (contact, flow, expires_ms)) in local {
            let same = self.shared.get(&agent).is_some_and(|(c, f, e)| {
                *c == contact && *f == flow && (e - expires_ms).abs() < 1000
            });
            if same {
                continue;
            }
            let r = within(self.deps.store.register(&Registration {
                agent: agent.clone(),
                contact: contact.clone(),
                flow,
                expires_ms,
            }))
            .await;
            if self.reached("register", r).is_some() {
                self.shared.insert(agent, (contact, flow, expires_ms));
            }
        }
    }

    /// Logs in here the operators registered with other nodes, and out those gone.
    async fn log_in_remote(&mut self, now_ms: i64) {
        let r = within(self.deps.store.remote_agents(now_ms)).await;
        let Some(rows) = self.reached("phones", r) else {
            return;
        };
        let local = |a: &str| self.deps.expiries.contains_key(a);
        let mut wanted: HashMap<String, (String, Flow)> = HashMap::new();
        for r in rows {
            if !local(&r.agent) {
                wanted.insert(r.agent, (r.contact, r.flow));
            }
        }
        let gone: Vec<(String, (String, Flow))> = self
            .remote
            .iter()
            .filter(|(a, _)| !wanted.contains_key(*a))
            .map(|(a, c)| (a.clone(), c.clone()))
            .collect();
        for (agent, ours) in gone {
            self.remote.remove(&agent);
            if local(&agent) {
                continue;
            }
            self.deps.contacts.remove_if(&agent, |_, c| *c == ours);
            info!(%agent, "operator registered with another node logged out");
            self.deps.queue.agent_logged_out(&agent).await;
        }
        for (agent, c) in wanted {
            if self.remote.get(&agent) == Some(&c) && self.deps.contacts.contains_key(&agent) {
                continue;
            }
            let old = self.remote.insert(agent.clone(), c.clone());
            match self.deps.contacts.entry(agent.clone()) {
                dashmap::mapref::entry::Entry::Occupied(mut e) => {
                    // A local registration's entry is the UA's own: leave it.
                    if old.as_ref() == Some(e.get()) {
                        e.insert(c);
                    }
                }
                dashmap::mapref::entry::Entry::Vacant(e) => {
                    e.insert(c);
                }
            }
            if old.is_none() {
                info!(%agent, "operator registered with another node logged in");
            }
            self.deps.queue.agent_logged_in(&agent).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::tickets::TicketStore;

    fn entry(caller: CallerId, queue: &str, skill: Option<&str>) -> LineEntry {
        LineEntry {
            caller,
            queue: queue.into(),
            skill: skill.map(str::to_owned),
            priority: 0,
            since: Instant::now(),
        }
    }

    fn udp(port: u16) -> Flow {
        Flow {
            transport: Transport::Udp,
            remote: SocketAddr::from(([127, 0, 0, 1], port)),
            conn: 0,
        }
    }

    /// Two nodes on one store (SQLite in memory, or PostgreSQL with `IVR311_TEST_PG`).
    async fn two_nodes() -> (TicketStore, ClusterStore, ClusterStore) {
        let db = TicketStore::open_in_memory().await.unwrap();
        let pool = db.pool().clone();
        let a = ClusterStore::new(pool.clone(), "a");
        let b = ClusterStore::new(pool, "b");
        (db, a, b)
    }

    const ANY: fn(&str, Option<&str>) -> bool = |_, _| true;
    const NEVER: fn(&str, i64) -> bool = |_, _| false;

    #[tokio::test]
    async fn an_operator_claimed_by_one_node_is_refused_to_the_other_until_released() {
        let (_db, a, b) = two_nodes().await;
        let t = 1_000_000;
        assert_eq!(
            a.claim(t, "1001", 0, t, ANY, NEVER).await.unwrap(),
            Claim::Granted
        );
        assert_eq!(
            b.claim(t + 1, "1001", 0, t, ANY, NEVER).await.unwrap(),
            Claim::Held { node: "a".into() }
        );
        assert!(!b.hold(t + 1, "1001").await.unwrap());
        // Another operator is free for b.
        assert_eq!(
            b.claim(t, "1002", 0, t, ANY, NEVER).await.unwrap(),
            Claim::Granted
        );
        assert_eq!(
            b.renew(t + 2).await.unwrap(),
            HashSet::from(["1001".to_owned()])
        );
        a.release("1001").await.unwrap();
        // b's release of a claim it does not have changes nothing.
        b.release("1001").await.unwrap();
        assert_eq!(b.renew(t + 3).await.unwrap(), HashSet::new());
        assert_eq!(
            b.claim(t + 3, "1001", 0, t, ANY, NEVER).await.unwrap(),
            Claim::Granted
        );
    }

    #[tokio::test]
    async fn a_dead_nodes_claims_end_with_their_lease_and_a_live_one_renews() {
        let (_db, a, b) = two_nodes().await;
        let t = 2_000_000;
        let lease = lease_ms();
        a.claim(t, "1001", 0, t, ANY, NEVER).await.unwrap();
        a.claim(t, "1002", 0, t, ANY, NEVER).await.unwrap();
        // a renews 1002's lease only by living: at t + lease - 1 it renews both.
        a.renew(t + lease - 1).await.unwrap();
        // a dies: after the renewed lease, b may take both.
        let later = t + 2 * lease;
        assert_eq!(b.renew(later).await.unwrap(), HashSet::new());
        assert_eq!(
            b.claim(later, "1001", 0, later, ANY, NEVER).await.unwrap(),
            Claim::Granted
        );
        // Just before the renewed lease ran out, a still held 1002.
        assert_eq!(
            b.claim(t + 2 * lease - 2, "1002", 0, t, ANY, NEVER)
                .await
                .unwrap(),
            Claim::Held { node: "a".into() }
        );
    }

    #[tokio::test]
    async fn an_earlier_caller_on_another_node_goes_first_if_the_operator_can_take_them() {
        let (_db, a, b) = two_nodes().await;
        let t = 3_000_000;
        // a has a Spanish caller waiting since t, in queue "general".
        a.publish_line(t, &[(entry(7, "general", Some("es")), t)])
            .await
            .unwrap();
        // b's caller came later: refused while the operator could take a's caller.
        assert_eq!(
            b.claim(t + 5, "1001", 0, t + 1, ANY, NEVER).await.unwrap(),
            Claim::Earlier {
                node: "a".into(),
                caller: 7
            }
        );
        // An operator who cannot take Spanish callers is b's to ring.
        let english = |_: &str, s: Option<&str>| s != Some("es");
        assert_eq!(
            b.claim(t + 5, "1001", 0, t + 1, english, NEVER)
                .await
                .unwrap(),
            Claim::Granted
        );
        b.release("1001").await.unwrap();
        // A caller of b who came first, or has a higher priority, goes first.
        assert_eq!(
            b.claim(t + 5, "1001", 0, t - 1, ANY, NEVER).await.unwrap(),
            Claim::Granted
        );
        b.release("1001").await.unwrap();
        assert_eq!(
            b.claim(t + 5, "1001", 1, t + 1, ANY, NEVER).await.unwrap(),
            Claim::Granted
        );
        b.release("1001").await.unwrap();
        // Deferred long enough: b skips that caller.
        let skip = |node: &str, caller: i64| node == "a" && caller == 7;
        assert_eq!(
            b.claim(t + 5, "1001", 0, t + 1, ANY, skip).await.unwrap(),
            Claim::Granted
        );
        b.release("1001").await.unwrap();
        // a's line is replaced by its next pass; a dead node's line ends with its lease.
        assert_eq!(
            b.claim(t + lease_ms() + 1, "1001", 0, t + 1, ANY, NEVER)
                .await
                .unwrap(),
            Claim::Granted
        );
        b.release("1001").await.unwrap();
        a.publish_line(t + 10, &[]).await.unwrap();
        assert_eq!(
            b.claim(t + 11, "1001", 0, t + 1, ANY, NEVER).await.unwrap(),
            Claim::Granted
        );
    }

    #[tokio::test]
    async fn registrations_are_seen_by_the_other_nodes_until_they_expire_or_move() {
        let (_db, a, b) = two_nodes().await;
        let t = 4_000_000;
        let r = Registration {
            agent: "1001".into(),
            contact: "sip:1001@192.0.2.10:5062".into(),
            flow: udp(5060),
            expires_ms: t + 60_000,
        };
        assert!(a.register(&r).await.unwrap());
        assert!(a.remote_agents(t).await.unwrap().is_empty());
        let seen = b.remote_agents(t).await.unwrap();
        assert_eq!(
            seen,
            vec![RemoteAgent {
                agent: "1001".into(),
                node: "a".into(),
                contact: r.contact.clone(),
                flow: udp(5060),
            }]
        );
        assert!(b.remote_agents(t + 60_000).await.unwrap().is_empty());
        // The phone registers with b: a's withdrawal later does not remove b's row.
        assert!(b.register(&r).await.unwrap());
        a.unregister("1001").await.unwrap();
        assert_eq!(a.remote_agents(t).await.unwrap().len(), 1);
        // A TCP flow is one node's connection: not shared.
        let tcp = Registration {
            agent: "1002".into(),
            flow: Flow {
                transport: Transport::Tcp,
                conn: 3,
                ..udp(5060)
            },
            ..r
        };
        assert!(!a.register(&tcp).await.unwrap());
        assert_eq!(b.remote_agents(t).await.unwrap().len(), 0);
    }
}
