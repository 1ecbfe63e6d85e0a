//! Agents logging in: REGISTER answered by the registrar, the contacts of agents logged in,
//! their bindings' expiry, and [`AgentEvent`]s for the queue.
//!
//! The registrar itself (digest, nonces bound to their source, back-off and login locks,
//! bindings) is [`crate::sip::registrar`], sans-IO; this file is its glue to the UA core: a
//! server transaction per REGISTER (so a retransmission gets the same answer and is not
//! counted twice), the expiry deadline on the core's timers table, the flows of logged-in
//! phones held open, the locks published for `/admin/agents`. It answers nothing but REGISTER.

use super::core::{Action, Core, ServerKey, TimerRef};
use crate::sip::message::Request;
use crate::sip::registrar::{AgentEvent, Registrar};
use crate::sip::transport::Flow;
use dashmap::DashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::warn;

/// The registrar glue's own state.
#[derive(Default)]
pub(super) struct Agents {
    /// Agents' log-in; none when no agents are configured (REGISTER is then refused).
    pub(super) registrar: Option<Registrar>,
    /// The registrar expiry the timers table holds (earliest scheduled).
    pub(super) timer: Option<Instant>,
    /// Where [`AgentEvent`]s go, once someone asked ([`super::UaCore::agent_events`]).
    pub(super) events: Option<mpsc::Sender<AgentEvent>>,
    /// Agent id → preferred contact URI and flow, kept by the UA core.
    pub(super) contacts: Arc<DashMap<String, (String, Flow)>>,
    /// Agent id → when its last binding expires, for every agent registered here (not the
    /// operators of other nodes the cluster adds to `contacts`).
    pub(super) expiries: Arc<DashMap<String, Instant>>,
}

impl Core {
    /// REGISTER (never part of a dialog): the registrar answers, through a server transaction
    /// so that retransmissions get the same answer and are not counted twice.
    pub(super) fn on_register(&mut self, req: Request, key: ServerKey, flow: Flow, now: Instant) {
        let Some(registrar) = self.agents.registrar.as_mut() else {
            let resp = self
                .response(&req, 403, "Forbidden", None)
                .header("Warning", "399 ivr311 \"no agents configured\"")
                .build();
            self.new_server_and_respond(key, req, flow, None, (403, resp), now);
            return;
        };
        let (reply, events) = registrar.handle(now, &req, flow);
        let locks = registrar.locks(now);
        *self.stats.locks.lock().unwrap_or_else(|e| e.into_inner()) = locks;
        let mut b = self.response(&req, reply.code, reply.reason, None);
        for (name, value) in &reply.headers {
            b = b.header(name, value);
        }
        let resp = b.build();
        self.new_server_and_respond(key, req, flow, None, (reply.code, resp), now);
        self.on_agent_events(events);
        self.schedule_registrar();
    }

    /// Keep [`super::UaCore::agent_contacts`] current and pass the events on. The flow an agent's
    /// phone is reached over is held open while it is logged in: a phone registered over TCP
    /// may send nothing but keep-alives between registrations, and the connection is the only
    /// way to reach it.
    pub(super) fn on_agent_events(&mut self, events: Vec<AgentEvent>) {
        self.sync_expiries();
        for ev in events {
            match &ev {
                AgentEvent::LoggedIn {
                    agent,
                    contact,
                    flow,
                } => {
                    self.act(Action::Hold(*flow));
                    if let Some((_, (_, old))) = self.agents.contacts.remove(agent) {
                        self.act(Action::Release(old));
                    }
                    self.agents
                        .contacts
                        .insert(agent.clone(), (contact.clone(), *flow));
                    if !self.lost.is_empty() {
                        self.flow_back(contact, *flow);
                    }
                }
                AgentEvent::LoggedOut { agent } => {
                    if let Some((_, (_, old))) = self.agents.contacts.remove(agent) {
                        self.act(Action::Release(old));
                    }
                }
            }
            let Some(tx) = &self.agents.events else {
                continue;
            };
            match tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    warn!(?ev, "agent event listener backlogged; event dropped")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => self.agents.events = None,
            }
        }
    }

    /// Publish when each registered agent's bindings expire.
    fn sync_expiries(&mut self) {
        let Some(registrar) = self.agents.registrar.as_ref() else {
            return;
        };
        let now: std::collections::HashMap<&str, Instant> = registrar.expiries().collect();
        let expiries = &self.agents.expiries;
        expiries.retain(|agent, _| now.contains_key(agent.as_str()));
        for (agent, at) in now {
            if expiries.get(agent).is_none_or(|e| *e != at) {
                expiries.insert(agent.to_owned(), at);
            }
        }
    }

    /// Make sure the timers table wakes us for the registrar's next expiry.
    fn schedule_registrar(&mut self) {
        self.sync_expiries();
        let Some(next) = self
            .agents
            .registrar
            .as_ref()
            .and_then(Registrar::next_expiry)
        else {
            return;
        };
        if self.agents.timer.is_some_and(|t| t <= next) {
            return;
        }
        self.agents.timer = Some(next);
        self.arm(next, TimerRef::Registrar);
    }

    /// The registrar's next binding expiry is due.
    pub(super) fn on_registrar_timer(&mut self, now: Instant) {
        if self.agents.timer.is_some_and(|t| t <= now) {
            self.agents.timer = None;
        }
        let events = match self.agents.registrar.as_mut() {
            Some(r) => r.expire(now),
            None => return,
        };
        self.on_agent_events(events);
        self.schedule_registrar();
    }
}
